"""Shared pieces of the export tests (imported by name, so no clash between conftest files)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from p4q_lightning import calibrate, get_spec, quantize
from p4q_lightning.export import export_lowbit
from p4q_lightning.quant import ALL_GROUPS

TINY = "export-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = [f"class {i}" for i in range(10)]


def export_head(path: Path, student, tiny_name: str, text: torch.Tensor) -> Path:
    """Export ``student`` with a classifier head over :data:`CLASSNAMES`; the file's path."""
    return export_lowbit(
        path,
        student,
        model_name=tiny_name,
        classnames=CLASSNAMES,
        text_features=text,
        logit_scale=100.0,
    ).path


def make_student(tiny_float, preset: str):
    model, tokenizer = tiny_float
    # min-max ranges: the export does not care how ranges were chosen, and OMSE is slow
    student = quantize(model, get_spec(preset, {g: {"a_observer": "minmax"} for g in ALL_GROUPS}))
    g = torch.Generator().manual_seed(1)
    calibrate(
        student,
        torch.randn(16, 3, 32, 32, generator=g),
        tokenizer(["a photo of a cat.", "a dog", "bird"]),
        progress=False,
    )
    with torch.no_grad():
        text = F.normalize(student.encode_text(tokenizer(CLASSNAMES)), dim=-1)
    return student, text
