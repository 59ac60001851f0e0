"""Seeds derived from the run's seed, so that random choices do not depend on *when* or on
*which rank* they are drawn.

Lightning's ``seed_everything`` seeds the global generator once per process, and a DDP launch
re-seeds it on every rank after the model was built; anything drawn from the global generator
therefore differs between one process and many, and between a fresh and a resumed run. Every
random choice of a fit (prompt initialisation, adapter initialisation, shuffling) instead comes
from its own generator, seeded from ``(run seed, purpose)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch


def run_seed(default: int = 0) -> int:
    """The seed ``seed_everything`` set for this run (the same on every rank), else ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else int(default)


def seed_from_text(text: str) -> int:
    """A 63-bit seed hashed from ``text`` (sha256), the same on every platform and run."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derived_seed(purpose: str, default: int = 0) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"prompt"``), fixed by the run seed."""
    return seed_from_text(f"{run_seed(default)}:{purpose}")


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run the block with the global CPU generator seeded with ``seed``, restoring its state
    afterwards (for code that draws from the global generator, e.g. module initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def generator(purpose: str, default: int = 0) -> torch.Generator:
    """A CPU generator seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(purpose, default))
