"""Check an exported graph against the model it came from, in onnxruntime."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from p4q_lightning.export.loader import LowBitCLIP
from p4q_lightning.export.onnx.towers import IMAGES, LOGITS, image_size


@dataclass(frozen=True)
class Agreement:
    images: int
    same_top1: int
    min_cosine: float


def model_logits(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The fake-quant logits of a ``P4QClassifier`` or ``LowBitCLIP``."""
    with torch.no_grad():
        if isinstance(model, LowBitCLIP):
            return model.logits(images).float()
        return model.student_logits(images).float()


def onnx_logits(path: str | os.PathLike[str], images: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([LOGITS], {IMAGES: images.float().numpy()})[0])


def agreement(
    model: Any, path: str | os.PathLike[str], images: torch.Tensor | None = None, n: int = 16
) -> Agreement:
    """Top-1 and logits cosine of the graph vs ``model`` (default: ``n`` seeded noise images)."""
    if images is None:
        clip = model.clip if isinstance(model, LowBitCLIP) else model.student
        h, w = image_size(clip.visual)
        images = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    want, got = model_logits(model, images), onnx_logits(path, images)
    return Agreement(
        images=len(images),
        same_top1=int(want.argmax(1).eq(got.argmax(1)).sum()),
        min_cosine=float(F.cosine_similarity(want, got, dim=-1).min()),
    )
