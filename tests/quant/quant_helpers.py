"""Helpers shared by the PTQ-engine tests (a tiny open_clip CLIP, a calibrated student)."""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from p4q_lightning import calibrate, quantize

TINY_IMAGE = 32


def build_tiny_clip(seed: int = 0) -> nn.Module:
    """An ordinary open_clip ``CLIP`` (ViT image tower, text transformer with
    ``nn.MultiheadAttention`` and the causal mask, OpenAI vocabulary), narrow and shallow."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "image_size": TINY_IMAGE,
            "patch_size": 8,
            "width": 64,
            "layers": 2,
            "head_width": 16,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    )
    return model.eval()


def calibrated(
    model: nn.Module, preset: str, images: torch.Tensor, texts: torch.Tensor
) -> nn.Module:
    student = quantize(model, preset)
    calibrate(student, images=[images], texts=[texts], progress=False)
    return student
