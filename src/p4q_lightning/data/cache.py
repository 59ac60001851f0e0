"""Where p4q_lightning caches things it computes once (teacher weights, split files)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "P4Q_CACHE_DIR"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$P4Q_CACHE_DIR``, else ``~/.cache/p4q_lightning``."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "p4q_lightning"
    return Path(root).expanduser()
