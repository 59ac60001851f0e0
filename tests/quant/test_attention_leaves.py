"""Quantized attention holds its projections as leaves; old state dicts still load.

Before the q/k/v projection became the ``in_proj`` QuantLinear, the attention kept
``in_proj_weight``/``in_proj_bias``, ``input_quantizer.*``, ``weight_quantizer.*`` and
``weights_frozen`` itself. Slim checkpoints and export files written then carry those names;
a state dict is data, so the old layout is built here by renaming a new one's keys.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from quant_helpers import calibrated
from torch import nn

import p4q_lightning
from p4q_lightning import quantize
from p4q_lightning.legacy import LEGACY_ATTENTION_KEYS, upgrade_attention_key
from p4q_lightning.quant import GroupSpec, QuantLinear, QuantMultiheadAttention

W8A8 = GroupSpec(w_bits=8, a_bits=8, a_observer="minmax")


def _old_layout(state: dict[str, torch.Tensor], attention_prefixes: list[str]) -> dict:
    """``state`` with every attention's keys under their pre-leaf names."""
    out = {}
    for key, value in state.items():
        for owner in attention_prefixes:
            for old, new in LEGACY_ATTENTION_KEYS:
                local = key[len(owner) :] if key.startswith(owner) else None
                if local is not None and (
                    local == new or (new.endswith(".") and local.startswith(new))
                ):
                    key = owner + old + local[len(new) :]
                    break
        out[key] = value
    return out


def _calibrated_attention(seed: int) -> QuantMultiheadAttention:
    torch.manual_seed(seed)
    attn = QuantMultiheadAttention(
        nn.MultiheadAttention(32, 4, batch_first=True), W8A8, W8A8, W8A8, "text"
    )
    attn.in_proj.freeze_weights()
    attn.out_proj.freeze_weights()
    for q in (attn.in_proj.input_quantizer, attn.out_proj.input_quantizer):
        q.set_range(torch.tensor([-3.0]), torch.tensor([3.0]))
    for q in (attn.q_quantizer, attn.k_quantizer, attn.v_quantizer):
        q.set_range(torch.tensor([-4.0]), torch.tensor([4.0]))
    attn.probs_quantizer.set_range(torch.tensor([0.0]), torch.tensor([1.0]))
    attn(torch.randn(2, 5, 32))  # every quantizer is ready
    return attn


def test_in_proj_is_a_quant_linear_sharing_the_float_parameters() -> None:
    mha = nn.MultiheadAttention(32, 4)
    attn = QuantMultiheadAttention(mha, W8A8, W8A8, W8A8, "vision")
    assert isinstance(attn.in_proj, QuantLinear) and attn.in_proj.group == "vision.attn_qkv"
    assert attn.in_proj.weight is mha.in_proj_weight and attn.in_proj.bias is mha.in_proj_bias
    assert attn.out_proj.weight is mha.out_proj.weight
    assert {n for n, _ in attn.named_parameters()} == {
        "in_proj.weight",
        "in_proj.bias",
        "out_proj.weight",
        "out_proj.bias",
    }


def test_building_the_attention_draws_nothing_from_the_rng() -> None:
    """Seeded runs draw the same numbers after ``quantize`` as before in_proj was a leaf."""
    mha = nn.MultiheadAttention(32, 4)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    QuantLinear.sharing(mha.in_proj_weight, mha.in_proj_bias, W8A8, "text.attn_qkv")
    assert torch.equal(torch.rand(3), want)


def test_separate_qkv_weights_are_refused() -> None:
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
    assert mha.in_proj_weight is None
    with pytest.raises(ValueError, match="packed in_proj_weight"):
        QuantMultiheadAttention(mha, W8A8, W8A8, W8A8, "text")


def test_old_layout_state_dict_loads_into_the_attention() -> None:
    source = _calibrated_attention(0)
    state = source.state_dict()
    old = _old_layout(state, [""])
    assert "in_proj_weight" in old and "input_quantizer.scale" in old
    assert "weights_frozen" in old and not any(k.startswith("in_proj.") for k in old)
    target = _calibrated_attention(1)
    target.load_state_dict(old)  # strict: every key renamed, none left over
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])


def test_open_clip_float_attention_state_dict_loads() -> None:
    """open_clip's names (``in_proj_weight``) still load into the quantized attention."""
    mha = nn.MultiheadAttention(32, 4)
    attn = QuantMultiheadAttention(nn.MultiheadAttention(32, 4), W8A8, W8A8, W8A8, "text")
    result = attn.load_state_dict(mha.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all("quantizer" in k or "weights_frozen" in k for k in result.missing_keys)
    assert torch.equal(attn.in_proj.weight, mha.in_proj_weight)


def test_old_layout_student_state_dict_loads_strictly(tiny_clip, tiny_images, prompts) -> None:
    student = calibrated(tiny_clip, "w8a8", tiny_images, prompts)
    owners = [f"{n}." for n, m in student.named_modules() if isinstance(m, QuantMultiheadAttention)]
    old = _old_layout(student.state_dict(), owners)
    assert any(k.endswith(".attn.in_proj_weight") for k in old)
    fresh = quantize(tiny_clip, "w8a8")
    fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(tiny_images), student.encode_image(tiny_images))
        assert torch.equal(fresh.encode_text(prompts), student.encode_text(prompts))


def test_new_keys_are_not_renamed() -> None:
    assert upgrade_attention_key("in_proj.weight") is None
    assert upgrade_attention_key("q_quantizer.scale") is None
    assert upgrade_attention_key("out_proj.input_quantizer.scale") is None
    assert upgrade_attention_key("input_quantizer.scale") == "in_proj.input_quantizer.scale"


def test_no_module_reads_torchs_private_qkv_flag() -> None:
    """``in_proj_weight is None`` is the public test for separate q/k/v weights."""
    root = Path(p4q_lightning.__file__).parent
    users = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "_qkv_same_embed_dim"
    ]
    assert users == []
