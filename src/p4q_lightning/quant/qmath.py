"""Uniform and log2 quantization arithmetic.

The hot path uses torch's fused fake-quant kernels (one kernel per tensor, straight-through
gradient inside the clip range). The plain-expression versions here serve the observers'
range search, where no gradient is needed.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def symmetric_qmax(bits: int) -> int:
    """Largest code of a signed symmetric grid; codes lie in [-qmax, qmax] (restricted range)."""
    return 2 ** (bits - 1) - 1


def symmetric_scale(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    return max_abs.float().clamp_min(EPS) / symmetric_qmax(bits)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float, integral) zero point of an unsigned grid [0, 2^bits - 1] covering [lo, hi].

    The range is widened to contain 0 so that zero (padding, ReLU output) is exact.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zero_point = (-lo / scale).round().clamp(0, qmax)
    return scale, zero_point


def fake_quant_reference_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize without a gradient path; broadcasts scale over the last dim."""
    return ((x / scale + zero_point).round().clamp(qmin, qmax) - zero_point) * scale


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fused fake-quant with a straight-through estimator.

    ``scale``/``zero_point`` hold one entry per tensor (``axis=None``) or per channel along
    ``axis``. Gradients pass unchanged inside the clip range and are zero outside it.
    """
    dtype = x.dtype
    xf = x if dtype == torch.float32 else x.float()
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, qmin, qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(
            xf, scale, zero_point, axis % x.dim(), qmin, qmax
        )
    return y if dtype == torch.float32 else y.to(dtype)


def log2_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2 quantizer for values in [0, 1] (post-softmax probabilities), with an STE.

    Levels are 2^-k for k = 0 .. 2^bits - 2; values below the smallest level go to 0.
    """
    n_levels = 2**bits - 1
    code = (-torch.log2(x.detach().clamp_min(EPS))).round()
    xq = torch.where(code < n_levels, torch.exp2(-code), torch.zeros_like(x))
    return x + (xq.to(x.dtype) - x).detach()
