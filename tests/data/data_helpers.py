"""Helpers that write small image datasets for the data tests (everything offline)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Three real ImageNet wnids and their CLIP names (open_clip IMAGENET_CLASSNAMES[0:3]).
WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write_image(path: Path, seed: int, size: int = 12, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_class_folders(
    root: Path,
    classes: Sequence[str],
    per_class: int | Sequence[int],
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    counts = [per_class] * len(classes) if isinstance(per_class, int) else list(per_class)
    k = seed * 10_000
    for cls, n in zip(classes, counts, strict=True):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k += 1
            write_image(root / cls / f"img_{i:03d}{ext}", k)
    return root


def label_counts(dataset: object) -> dict[int, int]:
    counts: dict[int, int] = {}
    for y in dataset.labels:  # type: ignore[attr-defined]
        counts[y] = counts.get(y, 0) + 1
    return counts


def shuffled(seq: Sequence[str], seed: int) -> list[str]:
    out = list(seq)
    random.Random(seed).shuffle(out)
    return out
