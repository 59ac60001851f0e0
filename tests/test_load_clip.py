"""load_clip: names (with close matches on a typo), pretrained None / checkpoint path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from p4q_lightning import load_clip


@pytest.fixture(autouse=True)
def _quiet_open_clip() -> Iterator[None]:
    logging.disable(logging.WARNING)  # "No pretrained weights loaded" for pretrained=None
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize(
    "typo,suggestion",
    [("ViT-B-23", "ViT-B-32"), ("vit-b-32", "ViT-B-32"), ("ViT-S32", "ViT-S-32")],
)
def test_unknown_model_name_lists_close_matches(typo: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=r"unknown open_clip model") as info:
        load_clip(typo)
    assert suggestion in str(info.value)
    assert "open_clip.list_models()" in str(info.value)


def test_missing_checkpoint_path_is_reported() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip("ViT-S-32", pretrained="/nonexistent/dir/weights.pt")


def test_random_init_and_checkpoint_path_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip("ViT-S-32", pretrained=None)
    assert not model.training, "returned in eval mode"
    tokens = tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    image = preprocess(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (300, 200)))
    assert image.shape == (3, 224, 224)
    path = tmp_path / "vit_s32.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)  # a different random init, then overwritten by the checkpoint
    loaded, _, _ = load_clip("ViT-S-32", pretrained=str(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_unknown_tag_fails_at_once_naming_the_tags_and_the_local_file_option() -> None:
    with pytest.raises(ValueError, match=r"openai.*--model\.pretrained /path/to/"):
        load_clip("ViT-B-32-quickgelu", pretrained="opneai")


def test_no_network_fails_fast_with_the_local_file_option(monkeypatch) -> None:
    from p4q_lightning.model import weights

    probed: list[str] = []
    monkeypatch.setattr(weights, "_cached_on_hub", lambda hub: False)
    monkeypatch.setattr(weights, "reachable", lambda host: probed.append(host) or False)
    with pytest.raises(ConnectionError, match=r"cannot be reached.*--model\.pretrained /path/"):
        load_clip("ViT-B-32-quickgelu", pretrained="openai")
    assert probed == ["huggingface.co"]


def test_random_weights_saved_to_a_file_load_by_path_through_the_module(tmp_path: Path) -> None:
    from p4q_lightning.model.build import build_teacher

    model, _ = build_teacher("ViT-S-32", None, init_seed=3)
    path = tmp_path / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = build_teacher("ViT-S-32", str(path), init_seed=4)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
