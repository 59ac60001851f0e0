"""Image transforms matching open_clip's preprocessing, plus CoOp's train augmentation.

Eval is open_clip's: bicubic resize of the shorter side, centre crop, normalise with the
model's mean/std (OpenAI CLIP's by default). Train is CoOp's: random resized crop (scale
0.08-1 by default) and horizontal flip. All accept PIL images and uint8 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

BICUBIC = InterpolationMode.BICUBIC


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize (shorter side), centre crop and normalise: open_clip's eval preprocessing."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_finish(mean, std),
        ]
    )


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    augment: bool = True,
) -> v2.Compose:
    """CoOp's augmentation: random resized crop and flip (``augment=False``: eval transform)."""
    if not augment:
        return eval_transform(image_size, mean, std)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=BICUBIC, antialias=True
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_finish(mean, std)])


def shrink(image: Image.Image | torch.Tensor, shorter_side: int) -> Image.Image | torch.Tensor:
    """Downscale so the shorter side is at most ``shorter_side`` (for in-memory caching)."""
    if isinstance(image, torch.Tensor):
        return image
    w, h = image.size
    if min(w, h) <= shorter_side:
        return image
    scale = shorter_side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
