"""Seeds derived from the run's seed, so that random choices do not depend on *when* or on
*which rank* they are drawn.

Lightning's ``seed_everything`` seeds the global generator once per process, and a DDP launch
re-seeds it on every rank after the model was built; anything drawn from the global generator
therefore differs between one process and many, and between a fresh and a resumed run. Every
random choice of a fit (prompt initialisation, adapter initialisation, shuffling) instead comes
from its own generator, seeded from ``(run seed, purpose)``.
"""

from __future__ import annotations

import hashlib
import os

import torch


def run_seed(default: int = 0) -> int:
    """The seed ``seed_everything`` set for this run (the same on every rank), else ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else int(default)


def derived_seed(purpose: str, default: int = 0) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"prompt"``), fixed by the run seed."""
    digest = hashlib.sha256(f"{run_seed(default)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(purpose: str, default: int = 0) -> torch.Generator:
    """A CPU generator seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(purpose, default))
