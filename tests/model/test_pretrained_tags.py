"""``load_clip`` resolves tags through the registry the demo (or anyone) registers into."""

from __future__ import annotations

import open_clip
import torch
from safetensors.torch import save_file

from p4q_lightning.model.clip import load_clip
from p4q_lightning.model.tiny import register_tiny_clip
from p4q_lightning.pretrained_tags import register_pretrained_resolver, resolve_registered_tag


def test_a_registered_tag_loads_its_weights_file(tmp_path):
    name = register_tiny_clip()
    torch.manual_seed(3)
    source = open_clip.create_model(name, pretrained=None)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    register_pretrained_resolver("test-mine", lambda tag: str(path) if tag == "mine" else None)

    model, _, _ = load_clip(name, "mine")

    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_demo_claims_synthetic_tags_only():
    import p4q_lightning.demo as demo

    assert demo.resolve_synthetic_tag("openai") is None
    assert resolve_registered_tag("laion2b_s34b_b79k") is None
