"""The p4q-tiny teacher: open_clip registration, cached deterministic pretraining, zero-shot."""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from p4q_lightning.demo import teacher
from p4q_lightning.demo.teacher import (
    PretrainConfig,
    encode_captions,
    ensure_teacher_checkpoint,
    register_tiny_clip,
)

QUICK = PretrainConfig(
    steps=2, batch_size=8, warmup_steps=1, warmup_text_frozen_steps=1, eval_per_class=1
)


@pytest.fixture(scope="module")
def quick_checkpoints(tmp_path_factory):
    """Seed 7 pretrained twice (in two caches) and seed 8 once, with a tiny recipe."""
    root = tmp_path_factory.mktemp("teacher")
    return {
        "a": ensure_teacher_checkpoint(world_seed=7, cache_dir=root / "a", config=QUICK),
        "b": ensure_teacher_checkpoint(world_seed=7, cache_dir=root / "b", config=QUICK),
        "other_seed": ensure_teacher_checkpoint(world_seed=8, cache_dir=root / "a", config=QUICK),
    }


def test_register_is_idempotent_and_builds_an_open_clip_vit():
    name = register_tiny_clip()
    assert name == register_tiny_clip() == "p4q-tiny"
    assert open_clip.list_models().count(name) == 1
    model = open_clip.create_model(name)
    assert type(model).__name__ == "CLIP" and type(model.visual).__name__ == "VisionTransformer"
    assert isinstance(model.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert isinstance(model.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert model.visual.image_size == (32, 32)


def test_importing_the_teacher_does_not_import_lightning():
    code = (
        "import sys; import p4q_lightning.demo.teacher as t; t.register_tiny_clip(); "
        "print(any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_caption_encoding_equals_open_clip_and_keeps_gradients():
    torch.manual_seed(0)
    model = open_clip.create_model(register_tiny_clip()).eval()
    captions = ["a photo of a striped red circle.", "a cross.", "a big dotted blue square."]
    tokens = open_clip.get_tokenizer("p4q-tiny")(captions)
    short = encode_captions(model, tokens)
    with torch.no_grad():
        assert torch.allclose(short, model.encode_text(tokens), atol=1e-5)
    short.sum().backward()
    assert model.token_embedding.weight.grad is not None


def test_checkpoint_is_cached_deterministic_and_loadable(quick_checkpoints, monkeypatch):
    first, other = quick_checkpoints["a"], quick_checkpoints["b"]
    assert first.name == other.name and first.parent != other.parent
    a, b = load_file(first), load_file(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads(first.with_suffix(".json").read_text())
    assert report["num_classes"] == 48 and report["world_seed"] == 7
    assert 0.0 <= report["zero_shot_top1"] <= 1.0

    # cached: a second call must not pretrain again
    monkeypatch.setattr(teacher, "pretrain_tiny_clip", lambda *a, **k: pytest.fail("retrained"))
    assert ensure_teacher_checkpoint(world_seed=7, cache_dir=first.parent, config=QUICK) == first
    # P4Q_CACHE_DIR is the default location
    monkeypatch.setenv("P4Q_CACHE_DIR", str(first.parent))
    assert ensure_teacher_checkpoint(world_seed=7, config=QUICK) == first

    model = open_clip.create_model("p4q-tiny", pretrained=str(first))
    assert torch.equal(model.state_dict()["text_projection"], a["text_projection"])


def test_teacher_does_not_depend_on_the_callers_thread_count():
    """`make test` (one thread) and `make demo` (all cores) must cache the same teacher."""
    config = PretrainConfig(
        steps=3, batch_size=16, warmup_steps=1, warmup_text_frozen_steps=1, eval_per_class=1
    )
    old = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            weights.append(teacher.pretrain_tiny_clip(5, config).state_dict())
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_different_world_seed_gives_different_weights(quick_checkpoints):
    a = load_file(quick_checkpoints["a"])
    b = load_file(quick_checkpoints["other_seed"])
    assert quick_checkpoints["a"].name != quick_checkpoints["other_seed"].name
    assert not torch.equal(a["visual.proj"], b["visual.proj"])


@pytest.mark.slow
def test_full_teacher_zero_shot_is_far_above_chance(tmp_path):
    """The shipped recipe: pretrain (a few minutes on 2 cores) and classify held-out images."""
    path = ensure_teacher_checkpoint(world_seed=0, cache_dir=tmp_path)
    report = json.loads(path.with_suffix(".json").read_text())
    chance = report["chance_top1"]
    assert report["test_images"] == 48 * 50
    assert report["zero_shot_top1"] > 10 * chance  # 48 classes: chance 2.1 %
    assert report["zero_shot_top1"] < 0.95  # not saturated: room for few-shot prompt tuning


def test_grouped_batches_share_all_but_one_attribute():
    from p4q_lightning.data.synthetic import WorldConfig
    from p4q_lightning.demo.teacher import sample_grouped_scenes

    world = WorldConfig()
    scenes = sample_grouped_scenes(48, world, torch.Generator().manual_seed(0), group_size=8)
    for g in range(6):
        rows = slice(8 * g, 8 * g + 8)
        assert scenes.colour[rows].unique().numel() == 1
        fixed = [
            a
            for a in ("shape", "texture", "size")
            if getattr(scenes, a)[rows].unique().numel() == 1
        ]
        assert len(fixed) >= 2  # every attribute but the group's varying one is shared
