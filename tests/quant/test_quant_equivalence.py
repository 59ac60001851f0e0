"""With quantization off, the quantized model is open_clip itself (to 1e-5 relative)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from p4q_lightning import load_clip, quantize
from p4q_lightning.quant import QuantMultiheadAttention, get_spec

RTOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["ViT-S-32", "ViT-B-32"])
def real_clip(request: pytest.FixtureRequest) -> nn.Module:
    logging.getLogger().setLevel(logging.ERROR)
    model, _, _ = load_clip(request.param, pretrained=None)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fp_student_equals_open_clip(
    real_clip: nn.Module, prompts: torch.Tensor, mode: str
) -> None:
    student = quantize(real_clip, "fp")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    try:
        for m in (real_clip, student):
            m.train(mode == "train")
        with torch.no_grad():
            assert _rel_err(student.encode_image(images), real_clip.encode_image(images)) <= RTOL
            assert _rel_err(student.encode_text(prompts), real_clip.encode_text(prompts)) <= RTOL
    finally:
        real_clip.eval()
    assert isinstance(student.visual.transformer.resblocks[0].attn, QuantMultiheadAttention)


def test_quantize_leaves_the_model_untouched(tiny_clip: nn.Module, prompts: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    student = quantize(tiny_clip, "w4a4")
    assert type(tiny_clip.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    from p4q_lightning import calibrate

    calibrate(student, images=[torch.randn(2, 3, 32, 32)], texts=[prompts], progress=False)
    for k, v in tiny_clip.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in student.parameters())


def _attention_pair(batch_first: bool) -> tuple[nn.MultiheadAttention, QuantMultiheadAttention]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    spec = get_spec("fp")
    q = QuantMultiheadAttention(
        mha, spec["text.attn_qkv"], spec["text.attn_internals"], spec["text.attn_out"], "text"
    )
    return mha, q


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "mask_kind", ["none", "causal_float", "causal_bool", "per_head_3d", "key_padding"]
)
def test_fp_attention_matches_torch_mha(batch_first: bool, mask_kind: str) -> None:
    """Every mask form nn.MultiheadAttention accepts gives the same output (2e-6 abs)."""
    mha, qmha = _attention_pair(batch_first)
    b, length = 3, 7
    x = torch.randn(b, length, 32) if batch_first else torch.randn(length, b, 32)
    kwargs: dict[str, torch.Tensor] = {}
    causal = torch.full((length, length), float("-inf")).triu_(1)
    if mask_kind == "causal_float":
        kwargs["attn_mask"] = causal
    elif mask_kind == "causal_bool":
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu_(1)
    elif mask_kind == "per_head_3d":
        kwargs["attn_mask"] = causal.expand(b * 4, length, length) + torch.randn(
            b * 4, length, length
        )
    elif mask_kind == "key_padding":
        pad = torch.zeros(b, length, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    with torch.no_grad():
        expected, _ = mha(x, x, x, need_weights=False, **kwargs)
        got, _ = qmha(x, x, x, need_weights=False, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
