"""Torch datasets over sources: decoded-once in-memory sets and lazily decoded ones.

Both yield ``(image FloatTensor[3, H, W], label int)``. Lazily decoded sets can skip
unreadable images (returning None, dropped by ``collate_skip_none``) instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from p4q_lightning.data.sources import CorruptImageError, ImageSource
from p4q_lightning.data.transforms import shrink

log = logging.getLogger(__name__)

Transform = Callable[[Any], torch.Tensor]


class MemoryDataset(Dataset):
    """Decoded images held in memory (PIL or uint8 tensors) with a per-access transform."""

    def __init__(
        self,
        images: Sequence[Image.Image | torch.Tensor],
        labels: Sequence[int],
        transform: Transform | None = None,
    ):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = list(images)
        self.labels = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.labels[index]


class SourceDataset(Dataset):
    """Items of one source split, decoded on access (for large evaluation splits)."""

    def __init__(
        self,
        source: ImageSource,
        split: str,
        indices: Sequence[int],
        transform: Transform | None = None,
        skip_corrupt: bool = False,
        flip_odd: bool = False,
    ):
        labels = source.labels(split)
        self.source, self.split = source, split
        self.indices = [int(i) for i in indices]
        self.labels = [int(labels[i]) for i in self.indices]
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.flip_odd = flip_odd  # deterministic flip augmentation for calibration
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        try:
            img = self.source.load(self.split, self.indices[index])
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            log.warning(
                "skipping unreadable image (%d so far in this process): %s", self.skipped, err
            )
            return None
        out = self.transform(img) if self.transform else img
        if self.flip_odd and index % 2 == 1:
            out = torch.flip(out, dims=[-1])
        return out, self.labels[index]


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` after dropping skipped (None) items."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(kept)


def decode_all(
    source: ImageSource,
    split: str,
    indices: Sequence[int],
    skip_corrupt: bool,
    shorter_side: int | None,
    threads: int = 1,
) -> tuple[list[Image.Image | torch.Tensor], list[int], list[str]]:
    """Decode the chosen items once (threads overlap file I/O and JPEG decoding).

    Returns images, labels and the names of the skipped unreadable files; without
    ``skip_corrupt`` the first unreadable file raises ``CorruptImageError`` naming it.
    """
    labels = source.labels(split)

    def one(i: int) -> Image.Image | torch.Tensor | None:
        try:
            img = source.load(split, i)
        except CorruptImageError:
            if not skip_corrupt:
                raise
            return None
        return shrink(img, shorter_side) if shorter_side else img

    if threads > 1 and len(indices) > 64:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(one, indices))
    else:
        decoded = [one(i) for i in indices]
    images, kept_labels, skipped = [], [], []
    for i, img in zip(indices, decoded, strict=True):
        if img is None:
            skipped.append(source.describe(split, i))
        else:
            images.append(img)
            kept_labels.append(int(labels[i]))
    if skipped:
        log.warning(
            "skipped %d unreadable %s images (skip_corrupt=True): %s%s",
            len(skipped),
            split,
            ", ".join(skipped[:3]),
            " ..." if len(skipped) > 3 else "",
        )
    return images, kept_labels, skipped
