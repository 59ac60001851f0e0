"""LowBitAdapter: blend, low-bit STE training, EMA input ranges, calibration."""

from __future__ import annotations

import pytest
import torch

from p4q_lightning.model.adapter import LowBitAdapter
from p4q_lightning.quant import GroupSpec, NotCalibratedError


def test_float_adapter_blends_residual():
    torch.manual_seed(0)
    a = LowBitAdapter(16, reduction=4, ratio=0.2)
    z = torch.randn(5, 16)
    branch = a.fc2(torch.relu(a.fc1(z)))
    torch.testing.assert_close(a(z), 0.2 * branch + 0.8 * z)
    assert a.fc1.weight.shape == (4, 16) and a.fc1.bias is not None
    assert LowBitAdapter(16, ratio=0.0)(z).equal(z)
    assert LowBitAdapter(16, bias=False).fc1.bias is None


def test_low_bit_adapter_trains_with_quantized_weights_and_ste():
    torch.manual_seed(0)
    a = LowBitAdapter(16, reduction=4, ratio=0.5, spec=GroupSpec(w_bits=4, a_bits=4))
    a.train()
    z = torch.randn(32, 16)
    out = a(z)
    # every weight it used was on a 4-bit per-channel grid
    w = a.fc1.weight_quantizer(a.fc1.weight.detach())
    codes = w / a.fc1.weight_quantizer.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7
    out.pow(2).sum().backward()
    for p in a.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert a.is_calibrated  # the EMA set the input ranges during the training step


def test_ema_ranges_update_in_training_and_freeze_in_eval():
    a = LowBitAdapter(8, reduction=2, spec=GroupSpec(w_bits=8, a_bits=8))
    q = a.fc1.input_quantizer
    a.train()
    a(torch.randn(4, 8))
    first = q.range_max.clone()
    a(10 * torch.randn(4, 8))
    assert q.range_max > first
    a.eval()
    frozen = q.range_max.clone()
    a(100 * torch.randn(4, 8))
    assert torch.equal(q.range_max, frozen)


def test_uncalibrated_eval_raises_and_calibrate_fixes_it():
    a = LowBitAdapter(8, reduction=2, spec=GroupSpec(w_bits=4, a_bits=4)).eval()
    with pytest.raises(NotCalibratedError):
        a(torch.randn(2, 8))
    a.calibrate([torch.randn(16, 8)])
    assert a.is_calibrated and not a.training
    assert all(q.mode == "ema" for q in a.input_quantizers())
    assert a(torch.randn(2, 8)).shape == (2, 8)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="ratio"):
        LowBitAdapter(8, ratio=1.5)
    with pytest.raises(ValueError, match="hidden"):
        LowBitAdapter(4, reduction=8)
