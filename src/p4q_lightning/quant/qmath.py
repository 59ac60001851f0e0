"""Uniform and log2 quantization arithmetic.

Fake quantization is one expression, ``clamp(round(x / s), qmin - z, qmax - z) * s``, which is
exactly ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` for an integral zero point. We do not
use torch's fused ``fake_quantize_per_*_affine`` kernels: on CPU they are scalar loops, about
8x slower than this vectorized expression (measured on a [16, 50, 3072] tensor), which made a
fake-quant ViT-B-32 run at 0.64x of float. Without autograd the expression runs in place on one
fresh tensor; with autograd a custom function keeps a boolean mask for the straight-through
gradient (identity inside the clip range, zero outside), as the fused kernels do.

The hot path stops one step earlier, at the *centered codes* ``clamp(round(x / s), qmin - z,
qmax - z)`` (integers stored as floats), and lets the consumer fold ``s`` into a scalar it
applies anyway (a matmul's ``alpha``, attention's softmax scale): fewer elementwise passes,
same values up to float rounding. Per-tensor parameters are Python floats there, since scalar
operands are cheaper than broadcast tensors.
"""

from __future__ import annotations

from typing import Any

import torch

EPS = 1e-12
#: A quantization parameter: a Python float (per tensor) or a broadcastable tensor.
Scalar = float | torch.Tensor


#: Weight grids. ``restricted``: codes [-(2^(b-1)-1), 2^(b-1)-1], scale max|w| / (2^(b-1)-1),
#: so +-max|w| are both codes. ``official`` (the P4Q / FQ-ViT code, ``bit_type.py`` and
#: ``observer/minmax.py``): the full signed range [-2^(b-1), 2^(b-1)-1] with scale
#: max|w| / (2^(b-1) - 0.5), i.e. max|w| spread over half of the 2^b - 1 steps.
WEIGHT_GRIDS = ("restricted", "official")
#: Activation grids. ``zero_exact``: the range is widened to contain 0, so zero is a code.
#: ``official``: scale (hi - lo) / (2^b - 1) over the range as found, zero point
#: round(-lo / scale) clamped to the codes (a range that excludes 0 is not widened).
ACT_GRIDS = ("zero_exact", "official")


def symmetric_qmax(bits: int) -> int:
    """Largest code of a signed symmetric grid; codes lie in [-qmax, qmax] (restricted range)."""
    return 2 ** (bits - 1) - 1


def weight_code_range(bits: int, grid: str = "restricted") -> tuple[int, int]:
    """(qmin, qmax) of the signed weight codes of ``grid`` (see :data:`WEIGHT_GRIDS`)."""
    qmax = symmetric_qmax(bits)
    if grid == "restricted":
        return -qmax, qmax
    if grid == "official":
        return -(qmax + 1), qmax
    raise ValueError(f"unknown weight grid {grid!r}: use one of {', '.join(WEIGHT_GRIDS)}")


def symmetric_scale(max_abs: torch.Tensor, bits: int, grid: str = "restricted") -> torch.Tensor:
    """Per-channel weight scale that maps ``max_abs`` onto the ends of ``grid``."""
    qmin, qmax = weight_code_range(bits, grid)
    return max_abs.float().clamp_min(EPS) / ((qmax - qmin) / 2)


def affine_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, grid: str = "zero_exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float, integral) zero point of an unsigned grid [0, 2^bits - 1] covering [lo, hi].

    ``zero_exact`` widens the range to contain 0 so that zero (padding, ReLU output) is exact;
    ``official`` keeps the range as found and clamps the zero point (see :data:`ACT_GRIDS`).
    """
    if grid not in ACT_GRIDS:
        raise ValueError(f"unknown activation grid {grid!r}: use one of {', '.join(ACT_GRIDS)}")
    lo, hi = lo.float(), hi.float()
    if grid == "zero_exact":
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zero_point = (-lo / scale).round().clamp(0, qmax)
    return scale, zero_point


def fake_quant_reference_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize without a gradient path; broadcasts scale over the last dim."""
    return ((x / scale + zero_point).round().clamp(qmin, qmax) - zero_point) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization whose gradient is the straight-through estimator (clipped)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        inv_scale: torch.Tensor,
        scale: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> torch.Tensor:
        q = torch.round(x * inv_scale)
        inside = (q >= lo) & (q <= hi)
        ctx.save_for_backward(inside)
        return q.clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _RoundClampSTE(torch.autograd.Function):
    """Centered codes ``clamp(round(x * inv_scale), lo, hi)`` with a straight-through gradient.

    d codes / dx is ``inv_scale`` inside the clip range and zero outside, so a consumer that
    multiplies the codes by the scale sees the usual STE gradient (identity inside the range).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, inv_scale: Scalar, lo: Scalar, hi: Scalar
    ) -> torch.Tensor:
        q = torch.mul(x, inv_scale).round_()
        inside = (q >= lo) & (q <= hi)
        ctx.save_for_backward(inside)
        ctx.inv_scale = inv_scale
        return q.clamp_(lo, hi)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside * ctx.inv_scale, None, None, None


def round_clamp(x: torch.Tensor, inv_scale: Scalar, lo: Scalar, hi: Scalar) -> torch.Tensor:
    """Centered codes of ``x`` (see :class:`_RoundClampSTE`).

    The parameters are Python floats (one grid for the tensor) or tensors broadcastable to
    ``x`` (several grids at once, e.g. q, k and v in one packed tensor). Computed in float32
    for half inputs and returned in ``x``'s dtype (codes up to 255 in magnitude are exact in
    float16 and bfloat16).
    """
    dtype = x.dtype
    xf = x if dtype in (torch.float32, torch.float64) else x.float()
    if torch.is_grad_enabled() and xf.requires_grad:
        q = _RoundClampSTE.apply(xf, inv_scale, lo, hi)
    else:
        q = torch.mul(xf, inv_scale).round_().clamp_(lo, hi)
    return q if q.dtype == dtype else q.to(dtype)


def fake_quant_prepared(
    x: torch.Tensor,
    inv_scale: torch.Tensor,
    scale: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> torch.Tensor:
    """Fake-quantize with precomputed parameters (all broadcastable to ``x``).

    ``lo``/``hi`` are the clip bounds in code space with the zero point folded in
    (``qmin - z``, ``qmax - z``). Half-precision inputs are computed in float32.
    """
    dtype = x.dtype
    xf = x if dtype in (torch.float32, torch.float64) else x.float()
    if torch.is_grad_enabled() and xf.requires_grad:
        y = _FakeQuantSTE.apply(xf, inv_scale, scale, lo, hi)
    else:
        y = torch.mul(xf, inv_scale).round_().clamp_(lo, hi).mul_(scale)
    return y if y.dtype == dtype else y.to(dtype)


def prepare_qparams(
    scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inv_scale, scale, lo, hi) as float tensors of ``shape`` for :func:`fake_quant_prepared`."""
    s = scale.float().reshape(shape)
    z = zero_point.float().reshape(shape)
    return s.reciprocal(), s, qmin - z, qmax - z


def channel_shape(ndim: int, axis: int | None, channels: int) -> tuple[int, ...]:
    """Broadcast shape of per-channel parameters along ``axis`` (per tensor: ``(1,)``)."""
    if axis is None:
        return (1,)
    shape = [1] * ndim
    shape[axis % ndim] = channels
    return tuple(shape)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake quantization with a straight-through estimator.

    ``scale``/``zero_point`` hold one entry per tensor (``axis=None``) or per channel along
    ``axis``. Gradients pass unchanged inside the clip range and are zero outside it.
    """
    shape = channel_shape(x.dim(), axis, scale.numel())
    return fake_quant_prepared(x, *prepare_qparams(scale, zero_point, qmin, qmax, shape))


def log2_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2 quantizer for values in [0, 1] (post-softmax probabilities), with an STE.

    Levels are 2^-k for k = 0 .. 2^bits - 2; values below the smallest level go to 0.
    """
    n_levels = 2**bits - 1
    # log2(0) = -inf gives code +inf, which maps to 0: masked probabilities stay exactly 0
    # (clamping x to a small epsilon first would turn them into a nonzero level at 8 bits).
    # in float32 for half inputs (bf16-mixed), so the levels are the float32 path's
    code = (-torch.log2(x.detach().float())).round()
    xq = torch.where(code < n_levels, torch.exp2(-code), torch.zeros_like(code))
    return x + (xq.to(x.dtype) - x).detach()
