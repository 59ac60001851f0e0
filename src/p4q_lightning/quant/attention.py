"""The one quantized attention core: heads, scores, softmax, probability quantization and the
output projection of a self-attention layer, optionally attending to a shared prefix too.

Both callers run their attention through :func:`attend`: ``QuantMultiheadAttention.forward``
(the normal path, every layer of both towers) and the shared-prefix text path
(:mod:`p4q_lightning.model.shared_prefix`), which runs a prefix every class shares once and
then lets each class's own positions attend to the prefix's keys and values.

A layer is described to the core by an :class:`AttentionLayer`, built at call time from the
attention module, so whatever sits in the module's projection slots is what runs:

- ``in_proj`` maps ``x`` ``[..., E]`` to the packed ``q | k | v`` ``[..., 3E]``. It is the
  ``QuantLinear`` leaf ``attn.in_proj``, an ``Int8Linear`` after ``convert_to_int8``, or any
  module put in that slot. **LoRA on q, k, v** (CLIP-LoRA: low-rank float factors added to the
  q/k/v projections of every block over the frozen quantized ones) is one wrapper module,
  ``attn.in_proj = LoRAWrapper(attn.in_proj)`` whose forward returns
  ``base(x) + scale * B(A(x))``: the normal and the shared-prefix path both call
  ``layer.in_proj`` here and pick it up without a change (the shared prefix's keys and values
  then carry the LoRA term too, and its gradient flows through them). ``convert_to_int8``
  looks inside such a wrapper and swaps the ``QuantLinear`` base it finds. A float model gets
  the same slot through ``quantize(model, "fp")``.
- ``project_out(out, scale)`` is the output projection of ``out * scale`` (the ``out_proj``
  leaf, folding the scale into its matmul where it can).
- ``internals`` are the quantizers of q, k, v and the probabilities, or None when attention
  runs in float.

With quantized internals q, k, v and the probabilities stay centered integer codes; their
scales (and 1/sqrt(head_dim)) fold into the score scale and into the output projection's
input. Operands that are codes are kept for the backward pass as int8/int16 (exact), which
quarters the memory autograd holds for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.quant.qmath import round_clamp
from p4q_lightning.quant.quantizer import ActivationQuantizer

#: A shared prefix's keys and values in one layer: ``k``, ``v`` as ``[1, heads, P, head_dim]``
#: (codes or float values) with their scales.
PrefixKV = tuple[torch.Tensor, torch.Tensor, float, float]


class AttentionInternals(NamedTuple):
    """The quantizers inside attention: q, k, v (per head dim) and the probabilities."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    probs: nn.Module


@dataclass(frozen=True)
class AttentionLayer:
    """What the core needs of one attention layer (see the module docstring).

    ``packed_cache`` is a dict owned by the attention module, where the core keeps the q/k/v
    quantization parameters as one small tensor between calls.
    """

    num_heads: int
    in_proj: Callable[[torch.Tensor], torch.Tensor]
    project_out: Callable[[torch.Tensor, float], torch.Tensor]
    internals: AttentionInternals | None = None
    packed_cache: dict[str, Any] | None = None


def float_attention_layer(mha: nn.MultiheadAttention) -> AttentionLayer:
    """A float ``nn.MultiheadAttention`` (packed q/k/v weight) as an :class:`AttentionLayer`."""
    if mha.in_proj_weight is None:
        raise ValueError("attention with separate q/k/v weights has no packed in_proj_weight")
    out_proj = mha.out_proj

    def in_proj(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, mha.in_proj_weight, mha.in_proj_bias)

    def project_out(out: torch.Tensor, scale: float) -> torch.Tensor:
        return F.linear(out * scale if scale != 1.0 else out, out_proj.weight, out_proj.bias)

    return AttentionLayer(mha.num_heads, in_proj, project_out)


def attend(
    layer: AttentionLayer,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    prefix: PrefixKV | None = None,
    dropout: float = 0.0,
    compact: bool = False,
) -> tuple[torch.Tensor, PrefixKV]:
    """Self-attention of batch-first ``x`` ``[B, L, E]``, also over ``prefix`` when given.

    ``mask`` is additive and broadcastable to the scores ``[B, heads, L, P + L]`` (the prefix's
    keys come first); None for no mask. Returns the output ``[B, L, E]`` and x's own keys and
    values with their scales (what a later call takes as ``prefix``).

    ``compact`` is the shared-prefix path's choice (always on with a prefix): scores and
    softmax are computed explicitly, also for float attention, and operands that are codes are
    kept for the backward pass as int8/int16. Without it (the normal path) float attention runs
    in torch's fused ``scaled_dot_product_attention`` and quantized attention in plain
    matmuls. Either way the forward values are the same up to float summation order.
    """
    b, length, width = x.shape
    (q, k, v), (s_q, s_k, s_v) = heads(layer, x)
    compact = compact or prefix is not None
    if layer.internals is None and not compact:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = layer.project_out(out.transpose(1, 2).reshape(b, length, width), 1.0)
        return out, (k, v, s_k, s_v)
    product = codes_product if compact else _matmul_product
    d_q, d_k, d_v, d_p = _code_dtypes(layer.internals)
    scores = product("bhrd,bhkd->bhrk", q, k, (d_q, d_k))
    if prefix is not None:
        k_p, v_p, s_kp, s_vp = prefix
        if (s_kp, s_vp) != (s_k, s_v):
            raise RuntimeError("prefix and class positions were quantized on different grids")
        # the prefix is a batch of one: contract against it per head without copying it n times
        scores = torch.cat([codes_product("bhrd,hpd->bhrp", q, k_p[0], (d_q, d_k)), scores], -1)
    # scaled in float before rounding to the scores' dtype (bf16 under autocast), then masked
    scores = scores * (s_q * s_k * q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.add_(mask)
    probs, s_p = _probs_codes(layer.internals, scores.softmax(dim=-1))
    if dropout:
        probs = F.dropout(probs, dropout)
    if prefix is not None:
        n_prefix = prefix[0].shape[-2]
        out = codes_product("bhrp,hpd->bhrd", probs[..., :n_prefix], prefix[1][0], (d_p, d_v))
        out = out + codes_product("bhrk,bhkd->bhrd", probs[..., n_prefix:], v, (d_p, d_v))
    else:
        out = product("bhrk,bhkd->bhrd", probs, v, (d_p, d_v))
    out = layer.project_out(out.transpose(1, 2).reshape(b, length, width), s_p * s_v)
    return out, (k, v, s_k, s_v)


def heads(
    layer: AttentionLayer, x: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[float, float, float]]:
    """q, k, v of batch-first ``x`` as ``[B, heads, L, head_dim]`` with their scales.

    With quantized internals they are centered codes (value = code * scale); otherwise float
    values with scale 1. Every step acts per position, so a sequence's q/k/v do not depend on
    the other sequences or positions it is batched with.
    """
    b, length, width = x.shape
    qkv = layer.in_proj(x)
    if layer.internals is None:
        return _split_heads(qkv, b, length, layer.num_heads), (1.0, 1.0, 1.0)
    return _qkv_codes(layer, qkv, b, length)


def _split_heads(
    qkv: torch.Tensor, b: int, length: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, L, 3E]`` -> q, k, v as ``[B, heads, L, head_dim]`` views."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.view(b, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def _qkv_codes(
    layer: AttentionLayer, qkv: torch.Tensor, b: int, length: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[float, float, float]]:
    """Centered codes of q, k and v with their scales.

    When all three quantizers are calibrated per-tensor grids (the usual case), the packed
    ``qkv`` tensor is quantized in one pass with a per-third scale instead of three passes
    over strided views; the values are identical to three separate calls.
    """
    assert layer.internals is not None
    quantizers = (layer.internals.q, layer.internals.k, layer.internals.v)
    packed = all(
        isinstance(q, ActivationQuantizer) and q.enabled and q.mode == "quant" and not q.per_channel
        for q in quantizers
    )
    if not packed:
        parts = _split_heads(qkv, b, length, layer.num_heads)
        pairs = [q.centered_codes(t) for q, t in zip(quantizers, parts, strict=True)]
        (c_q, s_q), (c_k, s_k), (c_v, s_v) = pairs
        return (c_q, c_k, c_v), (s_q, s_k, s_v)
    for q in quantizers:
        q.check_ready(qkv)
    params = tuple(q.float_params() for q in quantizers)  # (inv, scale, lo, hi) each
    cache = layer.packed_cache if layer.packed_cache is not None else {}
    hit = cache.get("qkv")
    if hit is None or hit[0] != params or hit[1].device != qkv.device:
        table = torch.tensor(params, dtype=torch.float32, device=qkv.device)  # [3, 4]
        cache["qkv"] = hit = (params, table.view(3, 4, 1, 1))
    table = hit[1]
    head_dim = qkv.shape[-1] // (3 * layer.num_heads)
    # [B, L, 3, heads, head_dim] against per-third parameters of shape [3, 1, 1]
    codes = round_clamp(
        qkv.view(b, length, 3, layer.num_heads, head_dim), table[:, 0], table[:, 2], table[:, 3]
    )
    q, k, v = codes.permute(2, 0, 3, 1, 4)
    return (q, k, v), (params[0][1], params[1][1], params[2][1])


def _probs_codes(
    internals: AttentionInternals | None, probs: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Quantized attention probabilities as ``(codes, scale)`` ((probs, 1) when float)."""
    if internals is None:
        return probs, 1.0
    return internals.probs.centered_codes(probs)


def _code_dtype(quantizer: nn.Module | None) -> torch.dtype | None:
    """Integer dtype holding this quantizer's centered codes, or None when its output is not
    integer codes (off, observing, per channel, log2 levels, float attention)."""
    if not isinstance(quantizer, ActivationQuantizer) or not quantizer.enabled:
        return None
    if quantizer.mode != "quant" or quantizer.per_channel or quantizer.bits is None:
        return None
    # centered codes lie in [-(2^bits - 1), 2^bits - 1]
    return torch.int8 if quantizer.bits <= 7 else torch.int16 if quantizer.bits <= 15 else None


def _code_dtypes(internals: AttentionInternals | None) -> tuple[torch.dtype | None, ...]:
    """Code dtypes of q, k, v and the probabilities (None: float values)."""
    if internals is None:
        return (None, None, None, None)
    return tuple(_code_dtype(q) for q in internals)


class _CodesProduct(torch.autograd.Function):
    """``einsum(equation, a, b)`` that keeps ``a`` and ``b`` for the backward pass as small
    integers: they are quantization codes (integers stored as floats), so this is exact and
    the attention's saved operands take a quarter (int8) or half (int16) of the memory."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, equation: str, a: torch.Tensor, b: torch.Tensor, dtypes: tuple[Any, Any]
    ) -> torch.Tensor:
        ctx.equation = equation
        ctx.save_for_backward(
            *(t if d is None else t.to(d) for t, d in zip((a, b), dtypes, strict=True))
        )
        return torch.einsum(equation, a, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # in the gradient's dtype (autocast's bmm dtype under bf16-mixed); codes are exact in it
        a, b = (t.to(grad.dtype) for t in ctx.saved_tensors)
        inputs, out = ctx.equation.split("->")
        sub_a, sub_b = inputs.split(",")
        grad_a = (
            torch.einsum(f"{out},{sub_b}->{sub_a}", grad, b) if ctx.needs_input_grad[1] else None
        )
        grad_b = (
            torch.einsum(f"{sub_a},{out}->{sub_b}", a, grad) if ctx.needs_input_grad[2] else None
        )
        return None, grad_a, grad_b, None


def _matmul_product(
    equation: str, a: torch.Tensor, b: torch.Tensor, dtypes: tuple[Any, Any]
) -> torch.Tensor:
    """The normal path's two products as plain matmuls (autograd keeps the float operands)."""
    if equation == "bhrd,bhkd->bhrk":
        return torch.matmul(a, b.transpose(-2, -1))
    if equation == "bhrk,bhkd->bhrd":
        return torch.matmul(a, b)
    raise ValueError(f"no plain product for {equation!r}")


def codes_product(
    equation: str, a: torch.Tensor, b: torch.Tensor, dtypes: tuple[Any, Any]
) -> torch.Tensor:
    """``einsum(equation, a, b)``; code operands (``dtypes`` not None) are saved compactly."""
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not grad or dtypes == (None, None):
        return torch.einsum(equation, a, b)
    return _CodesProduct.apply(equation, a, b, dtypes)
