"""Image transforms matching open_clip's preprocessing, plus CoOp's train augmentation.

Eval is open_clip's: resize of the shorter side, centre crop, normalise, with the size, mean,
std and interpolation of the model's own preprocessing config (:func:`model_preprocess`; OpenAI
CLIP's 224 px, mean/std and bicubic when unknown). Train is CoOp's: random resized crop (scale
0.08-1 by default) and horizontal flip. All accept PIL images and uint8 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

BICUBIC = InterpolationMode.BICUBIC
INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(
            f"interpolation={name!r}: use one of {', '.join(INTERPOLATIONS)}"
        ) from None


def model_preprocess(
    model_name: str, pretrained: str | None = None, model_config: str | None = None
) -> dict[str, Any]:
    """``image_size``, ``mean``, ``std`` and ``interpolation`` open_clip preprocesses with for
    this model and weights, read from its configs without building it or downloading: open_clip's
    defaults, then the pretrained tag's values, and the vision tower's ``image_size``."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg

    from p4q_lightning.model.build import register_model_config
    from p4q_lightning.model.tiny import register_tiny_clip
    from p4q_lightning.synthetic_name import is_synthetic

    if model_config:
        register_model_config(model_config)
    if model_name.startswith("p4q-"):
        register_tiny_clip()
    config = open_clip.get_model_config(model_name) or {}
    cfg = asdict(PreprocessCfg())
    if pretrained and not is_synthetic(pretrained):  # a tag (a path gives {})
        tagged = get_pretrained_cfg(model_name, pretrained)
        cfg.update({k: tagged[k] for k in ("mean", "std", "interpolation") if k in tagged})
    size = (config.get("vision_cfg") or {}).get("image_size")
    if size is not None:
        cfg["size"] = size
    size = cfg["size"]
    return {
        "image_size": int(size if isinstance(size, int) else size[0]),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": str(cfg["interpolation"]),
    }


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize (shorter side), centre crop and normalise: open_clip's eval preprocessing."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=interpolation_mode(interpolation), antialias=True),
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
    interpolation: str = "bicubic",
) -> v2.Compose:
    """CoOp's augmentation: random resized crop and flip (``augment=False``: eval transform)."""
    if not augment:
        return eval_transform(image_size, mean, std, interpolation)
    mode = interpolation_mode(interpolation)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=mode, antialias=True
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
