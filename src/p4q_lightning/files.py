"""Atomic file writes that honour the umask, and the package's one CSV writer.

``tempfile.mkstemp`` creates files readable by their owner only (0600); renamed into place they
would keep that mode, so a feature cache or export shared between users could not be read.
:func:`atomic_write` gives the finished file the mode a plain ``open(path, "w")`` would.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically with
    the umask's mode, on any failure (also ``KeyboardInterrupt``) it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """Write ``rows`` under a ``columns`` header, atomically (a reader sees the old file or the
    whole new one); keys outside ``columns`` are left out. Returns ``path``."""
    path = Path(path)
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
