"""Fixtures for the export tests: a tiny open_clip ViT CLIP, quantized and calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from p4q_lightning import calibrate, get_spec, load_clip, quantize
from p4q_lightning.quant import ALL_GROUPS

TINY = "export-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="session")
def tiny_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = Path(tmp_path_factory.mktemp("cfg")) / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="session")
def tiny_float(tiny_name: str):
    torch.manual_seed(0)
    model, _, tokenizer = load_clip(tiny_name, None)
    return model, tokenizer


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


@pytest.fixture(scope="session", params=["w8a8", "w4a4", "p4q-448"])
def student(request: pytest.FixtureRequest, tiny_float):
    return (request.param, *make_student(tiny_float, request.param))


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
