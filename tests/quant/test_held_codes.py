"""Frozen quantized weights held as integer codes compute bitwise what the float weights on the
grid compute, and autograd keeps no float copy of them for the backward pass."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from p4q_lightning import calibrate, quantize
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts
from p4q_lightning.quant import QuantLinear
from p4q_lightning.quant.held_codes import hold_codes

NAMES = ["red circle", "blue square", "green triangle", "cat", "a very long class name"]
PRESETS = ("w4a4", "w8a8", "p4q-official", "p4q-448")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module", params=PRESETS)
def student(request, tokenizer):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    ).eval()
    s = quantize(model, request.param)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(s, images=[images], texts=[tokenizer([f"a {n}." for n in NAMES])], progress=False)
    return request.param, s


def _text_layers(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.transformer.modules() if isinstance(m, QuantLinear)]


def _features_and_grad(model, tokenizer, chunk, ckpt):
    tower = TextTower(model)
    torch.manual_seed(3)
    pl = PromptLearner(NAMES, tokenizer, tower.width, n_ctx=6)
    pl.set_token_embedding(tower.token_embedding)
    feats = encode_prompts(
        model,
        pl(),
        pl.eot_index,
        chunk_size=chunk,
        checkpointing=ckpt,
        shared_prefix=pl.shared_prefix_length,
    )
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(7))
    (feats * weights).sum().backward()
    return feats.detach(), pl.ctx.grad.clone()


def test_every_quantized_text_layer_is_held_bit_for_bit(student):
    _, model = student
    for layer in _text_layers(model):
        if not layer.weight_quantizer.enabled:  # a float layer has no codes
            assert not layer.hold_as_codes() and layer.weight.numel() > 0
            continue
        weight = layer.weight.detach().clone()
        assert layer.hold_as_codes(), layer.group
        assert layer.weight.numel() == 0  # the float storage is gone
        assert layer.held.codes.dtype == torch.int8
        assert layer.held.codes.shape == weight.shape
        assert _same_bits(layer.held.dequantize(), weight), layer.group
        layer.restore_float()
        assert layer.held is None and _same_bits(layer.weight.detach(), weight)


@pytest.mark.parametrize(("chunk", "ckpt"), [(None, False), (2, False), (2, True)])
def test_held_codes_give_bitwise_the_features_and_gradients(student, tokenizer, chunk, ckpt):
    _, model = student
    want = _features_and_grad(model, tokenizer, chunk, ckpt)
    layers = [q for q in _text_layers(model) if q.hold_as_codes()]
    assert layers
    try:
        got = _features_and_grad(model, tokenizer, chunk, ckpt)
    finally:
        for q in layers:
            q.restore_float()
    assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1])


def test_no_float_weight_is_saved_for_the_backward_pass(student, tokenizer):
    """Every tensor autograd keeps is recorded by an outer pack hook; the held layers' saved
    weights are packed as codes instead, so none of those is a float weight-sized tensor."""
    _, model = student
    layers = [q for q in _text_layers(model) if q.weight_quantizer.enabled]
    shapes = {tuple(q.weight.shape) for q in layers} | {
        tuple(reversed(q.weight.shape)) for q in layers
    }

    def saved_weight_shaped(hold: bool) -> int:
        found = []

        def pack(t):
            if t.is_floating_point() and tuple(t.shape) in shapes:
                found.append(tuple(t.shape))
            return t

        held = [q for q in layers if q.hold_as_codes()] if hold else []
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _features_and_grad(model, tokenizer, None, False)
        finally:
            for q in held:
                q.restore_float()
        return len(found)

    assert saved_weight_shaped(hold=False) >= len(layers)  # the float path keeps each weight
    assert saved_weight_shaped(hold=True) == 0


def test_a_weight_off_its_grid_is_not_held():
    scale = torch.full((4,), 0.1)
    on_grid = torch.arange(-8.0, 8.0).view(4, 4) * scale.view(4, 1)
    assert hold_codes(on_grid, scale) is not None
    off = on_grid.clone()
    off[1, 2] += 1e-3
    assert hold_codes(off, scale) is None
    negative_zero = on_grid.clone()
    negative_zero[2, 0] = -0.0  # 0 * scale gives +0.0: not the same bits
    assert hold_codes(negative_zero, scale) is None
    wide = torch.arange(-300.0, 300.0, 150).view(1, 4)  # codes beyond int8: int16
    assert hold_codes(wide, torch.ones(1)).codes.dtype == torch.int16
