"""The fused hot path of the quantized layers against the plain quantize-dequantize reference.

The layers fold scales into matmul alphas and attention's score scale instead of dequantizing
every tensor. To check that folding exactly, every scale here is a power of two and every
weight and input lies on an integer grid: all products and sums are then exact in float32, so
the fused layer must equal the reference bit for bit (a swapped or missing scale cannot hide
inside a tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.quant import (
    ActivationQuantizer,
    GroupSpec,
    QuantLinear,
    QuantMultiheadAttention,
)

E, HEADS = 32, 2  # head_dim 16: 1/sqrt(16) = 2^-2 is exact
GEN = torch.Generator().manual_seed(0)


def _pow2_range(aq: ActivationQuantizer, log2_scale: int, zero_point: int) -> None:
    """Give ``aq`` the range whose scale is exactly 2^log2_scale and zero point exact."""
    s = 2.0**log2_scale
    qmax = 2**aq.bits - 1
    aq.set_range(torch.tensor([-zero_point * s]), torch.tensor([(qmax - zero_point) * s]))
    assert aq.scale.item() == s and aq.zero_point.item() == zero_point


def _grid_weight(rows: int, cols: int) -> torch.Tensor:
    """8-bit codes times 2^-7, each row reaching +-127 so min-max picks scale 2^-7 exactly."""
    codes = torch.randint(-127, 128, (rows, cols), generator=GEN).float()
    codes[:, 0] = 127.0 * torch.where(torch.rand(rows, generator=GEN) < 0.5, -1.0, 1.0)
    return codes * 2.0**-7


def _grid_input(*shape: int) -> torch.Tensor:
    return torch.randint(-8, 8, shape, generator=GEN).float() * 2.0**-2


def _attention(softmax_quantizer: str = "uniform") -> QuantMultiheadAttention:
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(_grid_weight(3 * E, E))
        mha.in_proj_bias.copy_(torch.randint(-64, 64, (3 * E,), generator=GEN) * 2.0**-10)
        mha.out_proj.weight.copy_(_grid_weight(E, E))
        mha.out_proj.bias.copy_(torch.randint(-64, 64, (E,), generator=GEN) * 2.0**-10)
    w8a8 = GroupSpec(w_bits=8, a_bits=8)
    internals = GroupSpec(a_bits=8, softmax_quantizer=softmax_quantizer)
    attn = QuantMultiheadAttention(mha, w8a8, internals, w8a8, "text")
    attn.in_proj.freeze_weights()
    attn.out_proj.freeze_weights()
    _pow2_range(attn.in_proj.input_quantizer, -2, 128)
    _pow2_range(attn.q_quantizer, -4, 120)  # q, k, v: three different scales on purpose
    _pow2_range(attn.k_quantizer, -3, 131)
    _pow2_range(attn.v_quantizer, -5, 127)
    if softmax_quantizer == "uniform":
        _pow2_range(attn.probs_quantizer, -8, 0)
    _pow2_range(attn.out_proj.input_quantizer, -5, 126)
    return attn


def _reference(
    attn: QuantMultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Dequantize everything, then compute attention exactly as nn.MultiheadAttention does."""
    b, length, _ = x.shape
    hd = E // HEADS
    qkv = F.linear(attn.in_proj.input_quantizer(x), attn.in_proj.weight, attn.in_proj.bias)
    q, k, v = qkv.view(b, length, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_quantizer(q), attn.k_quantizer(k), attn.v_quantizer(v)
    scores = (q * hd**-0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    out = attn.probs_quantizer(scores.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, length, E)
    lin = attn.out_proj
    return F.linear(lin.input_quantizer(out), lin.weight, lin.bias)


@pytest.mark.parametrize("softmax_quantizer", ["uniform", "log2"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_dequantized_reference(softmax_quantizer: str, causal: bool) -> None:
    attn = _attention(softmax_quantizer)
    x = _grid_input(3, 9, E)
    mask = torch.full((9, 9), float("-inf")).triu_(1) if causal else None
    with torch.no_grad():
        got, _ = attn(x, x, x, need_weights=False, attn_mask=mask)
        expected = _reference(attn, x, mask)
    assert torch.equal(got, expected)
    # every quantizer clips somewhere or uses several codes: the comparison is not vacuous
    assert got.abs().max() > 0 and got.unique().numel() > 100


def test_fused_attention_gradient_equals_reference_gradient() -> None:
    attn = _attention()
    x = _grid_input(2, 9, E).requires_grad_(True)
    mask = torch.full((9, 9), float("-inf")).triu_(1)
    weights = torch.randn(2, 9, E, generator=GEN)
    got, _ = attn(x, x, x, need_weights=False, attn_mask=mask)
    (got * weights).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    (_reference(attn, x, mask) * weights).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-7)
    assert (grad != 0).any()


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_equals_dequantized_reference(bias: bool) -> None:
    linear = nn.Linear(E, 24, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_grid_weight(24, E))
        if bias:
            linear.bias.copy_(torch.randint(-64, 64, (24,), generator=GEN) * 2.0**-10)
    q = QuantLinear.from_float(linear, GroupSpec(w_bits=8, a_bits=8), "vision.mlp_fc")
    q.freeze_weights()
    _pow2_range(q.input_quantizer, -2, 100)
    x = _grid_input(5, 7, E) * 1.5  # some inputs fall outside the range and clip
    with torch.no_grad():
        expected = F.linear(q.input_quantizer(x), q.weight, q.bias)
        assert torch.equal(q(x), expected)
        # a pre-scale (attention's folded dequantization) is applied before rounding
        assert torch.equal(
            q.forward_scaled(x, 0.5), F.linear(q.input_quantizer(x * 0.5), q.weight, q.bias)
        )
