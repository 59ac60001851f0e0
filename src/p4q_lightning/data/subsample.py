"""Base-to-novel generalisation (CoCoOp's protocol): a source restricted to half its classes.

CoCoOp's rule: take the sorted set of labels of the few-shot train list, ``m = ceil(n / 2)``;
the base classes are the first ``m``, the new classes the rest. Train, val and test keep only
the items of the chosen classes, relabelled ``0..`` in sorted order. A run trains on base and
is evaluated on base and on new (the same learned prompt with the new class names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from PIL import Image

from p4q_lightning.data.sources import ImageSource

Subsample = Literal["all", "base", "new"]
SUBSAMPLES = ("all", "base", "new")


def subsample_labels(train_labels: Sequence[int], which: str) -> list[int]:
    """The original labels ``which`` (``base`` or ``new``) keeps, in sorted order."""
    if which not in ("base", "new"):
        raise ValueError(f"subsample_classes={which!r}: use one of {', '.join(SUBSAMPLES)}")
    labels = sorted({int(y) for y in train_labels})
    m = math.ceil(len(labels) / 2)
    return labels[:m] if which == "base" else labels[m:]


class ClassSubset(ImageSource):
    """``source`` restricted to the classes ``keep`` (original labels, sorted), relabelled
    ``0..len(keep)-1``; item keys, templates and decoding are the source's."""

    def __init__(self, source: ImageSource, keep: Sequence[int], which: str):
        if not keep:
            raise ValueError(
                f"subsample_classes={which!r} leaves no class of {source.name} "
                f"({len(source.classnames)} classes)"
            )
        self.source, self.which = source, which
        self.kept = [int(c) for c in keep]
        relabel = {c: i for i, c in enumerate(self.kept)}
        self.name = f"{source.name}:{which}"
        self.classnames = [source.classnames[c] for c in self.kept]
        ids = getattr(source, "class_ids", None)
        self.class_ids = [ids[c] for c in self.kept] if ids else None
        self.templates = list(source.templates)
        self.draw_rule = getattr(source, "draw_rule", None)
        self._index: dict[str, list[int]] = {}
        self._labels: dict[str, list[int]] = {}
        for split in source.splits():
            labels = source.labels(split)
            chosen = [i for i, y in enumerate(labels) if int(y) in relabel]
            self._index[split] = chosen
            self._labels[split] = [relabel[int(labels[i])] for i in chosen]

    def splits(self) -> tuple[str, ...]:
        return self.source.splits()

    def labels(self, split: str) -> list[int]:
        return self._labels[split]

    def keys(self, split: str) -> list[str] | list[int]:
        keys = self.source.keys(split)
        return [keys[i] for i in self._index[split]]  # type: ignore[return-value]

    def load(self, split: str, index: int) -> Image.Image:
        return self.source.load(split, self._index[split][index])  # type: ignore[return-value]

    def describe(self, split: str, index: int) -> str:
        return self.source.describe(split, self._index[split][index])

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}-{self.which}"

    @property
    def split_key(self) -> str:
        return self.source.split_key
