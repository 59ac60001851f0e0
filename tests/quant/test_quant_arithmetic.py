"""Quantizer arithmetic against a float64 reference on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from p4q_lightning.quant import (
    ActivationQuantizer,
    Log2Quantizer,
    NotCalibratedError,
    WeightQuantizer,
)
from p4q_lightning.quant.qmath import fake_quant

GEN = torch.Generator().manual_seed(0)


def _x(*shape: int, spread: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * spread


def _check_against_reference(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
) -> None:
    """``y`` = fake-quant(x) on the grid (scale, zp broadcast to x), matching float64 rounding.

    float32 may round an exact .5 tie differently from float64, so codes may differ only where
    x / scale lies within 1e-4 of a tie; everywhere else the codes are identical.
    """
    x64, y64, s64, z64 = x.double(), y.double(), scale.double(), zp.double()
    codes = y64 / s64 + z64
    assert torch.allclose(codes, codes.round(), atol=1e-3), "output is off the grid"
    codes = codes.round()
    assert codes.min() >= qmin and codes.max() <= qmax
    ref_codes = (x64 / s64).round().add(z64).clamp(qmin, qmax)
    mismatch = codes != ref_codes
    t = x64 / s64
    near_tie = ((t - t.floor()) - 0.5).abs() < 1e-4
    assert not (mismatch & ~near_tie).any(), "codes differ from the float64 reference"
    lo, hi = (qmin - z64) * s64, (qmax - z64) * s64
    inside = (x64 >= lo) & (x64 <= hi)
    err = (y64 - x64).abs()
    half_step = (s64 / 2).expand_as(x64)
    assert (err[inside] <= half_step[inside] * (1 + 1e-5)).all(), (
        "error above half a step inside the range"
    )
    assert (codes[x64 > hi] == qmax).all() and (codes[x64 < lo] == qmin).all(), "not clipped"


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("lo_hi", [(-1.3, 4.1), (-5.0, 0.7), (-2.0, 2.0)])
def test_activation_per_tensor_matches_reference(bits: int, lo_hi: tuple[float, float]) -> None:
    aq = ActivationQuantizer(bits, "minmax")
    aq.set_range(torch.tensor([lo_hi[0]]), torch.tensor([lo_hi[1]]))
    x = _x(64, 33)
    y = aq(x)
    qmax = 2**bits - 1
    expected_scale = (lo_hi[1] - lo_hi[0]) / qmax
    assert aq.scale.item() == pytest.approx(expected_scale, rel=1e-6)
    _check_against_reference(x, y, aq.scale, aq.zero_point, 0, qmax)


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_zero_point_is_an_exact_integer_and_zero_is_exact(bits: int) -> None:
    aq = ActivationQuantizer(bits, "minmax")
    aq.set_range(torch.tensor([-0.37]), torch.tensor([2.9]))
    zp = aq.zero_point.item()
    assert aq.zero_point.dtype == torch.int32
    assert 0 < zp < 2**bits - 1, "an asymmetric range puts the zero point inside the grid"
    assert zp == round(0.37 / aq.scale.item())
    x = torch.tensor([0.0, -0.0, 1e-9, -1e-9])
    assert torch.equal(aq(x), torch.zeros(4))
    # an all-positive range is widened to contain 0: zero point 0, zero still exact
    aq.set_range(torch.tensor([0.5]), torch.tensor([3.0]))
    assert aq.zero_point.item() == 0
    assert aq(torch.zeros(3)).abs().max() == 0


def test_activation_per_channel_scales_follow_last_dim() -> None:
    aq = ActivationQuantizer(8, "minmax", per_channel=True, channels=5)
    lo = torch.tensor([-1.0, -0.1, -3.0, 0.0, -0.5])
    hi = torch.tensor([1.0, 0.2, 9.0, 4.0, 0.5])
    aq.set_range(lo, hi)
    assert torch.allclose(aq.scale.double(), (hi - lo).double() / 255, rtol=1e-6)
    x = _x(40, 5, spread=2.0)
    _check_against_reference(x, aq(x), aq.scale, aq.zero_point, 0, 255)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(24, 16), (12, 3, 4, 4)])
def test_weight_scales_are_per_output_channel(bits: int, shape: tuple[int, ...]) -> None:
    row_scale = torch.logspace(-3, 1, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    w = _x(*shape, spread=1.0) * row_scale
    wq = WeightQuantizer(bits, shape[0])
    wq.calibrate_from(w)
    qmax = 2 ** (bits - 1) - 1
    max_abs = w.double().reshape(shape[0], -1).abs().amax(dim=1)
    assert torch.allclose(wq.scale.double(), max_abs / qmax, rtol=1e-6)
    y = wq(w)
    bshape = (-1,) + (1,) * (len(shape) - 1)
    _check_against_reference(w, y, wq.scale.view(bshape), wq.zero_point.view(bshape), -qmax, qmax)
    codes = wq.codes(y)
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax
    assert torch.allclose(
        codes.double() * wq.scale.double().view(bshape), y.double(), rtol=1e-6, atol=0
    )
    # the largest weight of every row sits exactly on the top code
    assert torch.equal(
        codes.reshape(shape[0], -1).abs().amax(dim=1),
        torch.full((shape[0],), qmax, dtype=torch.int8),
    )


def test_fake_quant_functional_per_channel_axis() -> None:
    x = _x(6, 10)
    scale = torch.linspace(0.01, 0.5, 10)
    zp = torch.arange(10, dtype=torch.int32) * 3
    y = fake_quant(x, scale, zp, 0, 63, axis=-1)
    _check_against_reference(x, y, scale, zp, 0, 63)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_quantizer_levels(bits: int) -> None:
    n_levels = 2**bits - 1  # nonzero levels 2^0 .. 2^-(n_levels - 1), plus 0
    below_smallest = 2.0 ** -(n_levels - 1) / 4
    probs = torch.softmax(_x(8, 50, spread=4.0), dim=-1)
    probs = torch.cat([probs.flatten(), torch.tensor([1.0, 0.5, 0.25, 0.0, below_smallest])])
    y = Log2Quantizer(bits)(probs)
    levels = {0.0} | {2.0**-k for k in range(n_levels)}
    assert set(y.unique().tolist()) <= levels
    k = (-torch.log2(probs.double().clamp_min(1e-300))).round()
    ref = torch.where(k < n_levels, torch.exp2(-k), torch.zeros_like(k))
    assert torch.equal(y.double(), ref)
    assert y[-5:].tolist() == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_straight_through_gradient_is_one_inside_and_zero_outside() -> None:
    aq = ActivationQuantizer(4, "minmax")
    aq.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    x = torch.linspace(-3, 4, 301, requires_grad=True)
    aq(x).sum().backward()
    lo, hi = (
        (0 - aq.zero_point.item()) * aq.scale.item(),
        (15 - aq.zero_point.item()) * aq.scale.item(),
    )
    inside = (x.detach() >= lo - aq.scale.item() / 2) & (x.detach() <= hi + aq.scale.item() / 2)
    assert torch.equal(x.grad, inside.float())
    # the centered-codes path (scale folded by the consumer) has the same gradient
    x.grad = None
    codes, s = aq.centered_codes(x)
    (codes * s).sum().backward()
    assert torch.allclose(x.grad, inside.float(), rtol=1e-6, atol=0)
    # log2: identity gradient
    p = torch.rand(20, requires_grad=True)
    Log2Quantizer(4)(p).sum().backward()
    assert torch.equal(p.grad, torch.ones(20))


def test_centered_codes_times_scale_equals_fake_quant() -> None:
    aq = ActivationQuantizer(6, "minmax")
    aq.set_range(torch.tensor([-0.8]), torch.tensor([3.3]))
    x = _x(32, 64)
    codes, s = aq.centered_codes(x)
    assert torch.equal(codes, codes.round())
    torch.testing.assert_close(codes * s, aq(x), rtol=1e-6, atol=0)
    # with a pre-scale folded into rounding: a one-step difference is allowed only at ties
    codes, s = aq.centered_codes(x, pre_scale=0.37)
    expected = aq(x * 0.37)
    diff = (codes * s - expected).abs()
    assert diff.max() <= s * (1 + 1e-5)
    assert (diff > 1e-6).float().mean() < 1e-3


def test_half_precision_input_keeps_its_dtype() -> None:
    aq = ActivationQuantizer(8, "minmax")
    aq.set_range(torch.tensor([-2.0]), torch.tensor([2.0]))
    x = _x(16, 16).clamp(-2, 2)
    for dtype in (torch.float16, torch.bfloat16):
        y = aq(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(
            y.float(), aq(x.to(dtype).float()).to(dtype).float(), rtol=0, atol=0
        )


def test_uncalibrated_quantizers_refuse_to_run() -> None:
    with pytest.raises(NotCalibratedError, match="calibrate"):
        ActivationQuantizer(8)(torch.randn(3))
    with pytest.raises(NotCalibratedError, match="calibrate"):
        ActivationQuantizer(8).centered_codes(torch.randn(3))
    with pytest.raises(NotCalibratedError, match="calibrate"):
        WeightQuantizer(4, 3)(torch.randn(3, 2))
    # disabled quantizers are the identity and need nothing
    x = torch.randn(3)
    assert ActivationQuantizer(None)(x) is x
    assert WeightQuantizer(None, 3)(x) is x
    assert math.isclose(ActivationQuantizer(None).centered_codes(x, 0.5)[1], 0.5)
