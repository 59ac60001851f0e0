"""The ``synthetic[:<world seed>]`` name of the embedded demo world and its teacher.

One parser for the dataset argument (``FewShotDataModule(dataset="synthetic:3")``) and the
pretrained tag (``load_clip(..., pretrained="synthetic:3")``). A leaf module: the model layer
imports it without importing the data layer.
"""

from __future__ import annotations

SYNTHETIC = "synthetic"


def is_synthetic(name: str | None) -> bool:
    """True for ``synthetic`` and ``synthetic:<anything>`` (the latter may still be malformed)."""
    return isinstance(name, str) and (name == SYNTHETIC or name.startswith(SYNTHETIC + ":"))


def synthetic_world_seed(name: str | None, default: int = 0) -> int | None:
    """The world seed of ``synthetic`` (``default``) or ``synthetic:<seed>``; None for any other
    name. A malformed seed (``synthetic:x``) is a ``ValueError`` naming the accepted forms."""
    if not is_synthetic(name):
        return None
    assert name is not None
    if name == SYNTHETIC:
        return int(default)
    text = name.split(":", 1)[1]
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{name!r}: use 'synthetic' or 'synthetic:<world seed>' (an integer)"
        ) from None
