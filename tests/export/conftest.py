"""Fixtures for the export tests: a tiny open_clip ViT CLIP, quantized and calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from export_helpers import TINY, TINY_CFG, make_student

from p4q_lightning import load_clip


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


@pytest.fixture(scope="session", params=["w8a8", "w4a4", "p4q-448", "p4q-official"])
def student(request: pytest.FixtureRequest, tiny_float):
    return (request.param, *make_student(tiny_float, request.param))


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
