"""Shared-prefix text encoding: the part of a prompt that every class shares runs once.

With a unified context and the class name after it, positions ``[SOS] ctx_1 .. ctx_n`` are the
same for every class. Under the causal mask their hidden states in every layer depend only on
themselves, so they are computed once (a batch of one) and each class runs only its own
positions (name, period, EOT), attending to the prefix's keys and values layer by layer. The
context's gradient flows through the one shared prefix.

This is exact, also for the quantized tower: every quantizer on the way is static and acts per
position (per tensor or per channel), so a position's codes do not depend on what it is batched
with; integer-coded q/k/v products are exact sums in float32. What can differ is float
summation order (a softmax over P + R keys instead of L with -inf entries), hence a code at a
rounding tie. :func:`supports_shared_prefix` says when the tower qualifies; otherwise callers
use the full path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.quant.modules import QuantMultiheadAttention
from p4q_lightning.quant.quantizer import ActivationQuantizer

#: Per layer: the prefix's keys and values (heads layout, batch of one) and their scales.
PrefixKV = tuple[torch.Tensor, torch.Tensor, float, float]

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def _block_supported(block: nn.Module, training: bool) -> bool:
    if not all(hasattr(block, part) for part in _BLOCK_PARTS) or hasattr(block, "ln_1_kv"):
        return False  # not open_clip's ResidualAttentionBlock (custom or cross-attention blocks)
    attn = block.attn
    if isinstance(attn, QuantMultiheadAttention):
        return not (training and attn.dropout)
    if isinstance(attn, nn.MultiheadAttention):
        packed = attn.in_proj_weight is not None  # None: separate q/k/v weights
        return packed and attn.bias_k is None and not (training and attn.dropout)
    return False


def supports_shared_prefix(transformer: nn.Module) -> bool:
    """Whether ``transformer``'s blocks can run a shared prefix once and stay exact.

    Needs open_clip's default blocks (float ``nn.MultiheadAttention`` or our quantized one)
    and every activation quantizer on a fixed range: one that observes or tracks an EMA
    reads the whole batch, so splitting the batch would change its range.
    """
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not all(_block_supported(b, transformer.training) for b in blocks):
        return False
    return all(
        q.mode == "quant" or not q.enabled
        for q in transformer.modules()
        if isinstance(q, ActivationQuantizer)
    )


def _heads(attn: nn.Module, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...]]:
    """q, k, v of batch-first ``x`` as ``[B, heads, L, head_dim]`` and their scales."""
    if isinstance(attn, QuantMultiheadAttention):
        return attn.heads(x)
    b, length, width = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, length, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return (q, k, v), (1.0, 1.0, 1.0)


def _project_out(attn: nn.Module, out: torch.Tensor, scale: float) -> torch.Tensor:
    if isinstance(attn, QuantMultiheadAttention):
        return attn.project_out(out, scale)
    return F.linear(out * scale if scale != 1.0 else out, attn.out_proj.weight, attn.out_proj.bias)


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


def _product(
    equation: str, a: torch.Tensor, b: torch.Tensor, dtypes: tuple[Any, Any]
) -> torch.Tensor:
    """``einsum(equation, a, b)``; code operands (``dtypes`` not None) are saved compactly."""
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not grad or dtypes == (None, None):
        return torch.einsum(equation, a, b)
    return _CodesProduct.apply(equation, a, b, dtypes)


def _code_dtype(quantizer: nn.Module | None) -> torch.dtype | None:
    """Integer dtype holding this quantizer's centered codes, or None when its output is not
    integer codes (off, per channel, log2 levels, float attention)."""
    if not isinstance(quantizer, ActivationQuantizer) or not quantizer.enabled:
        return None
    if quantizer.mode != "quant" or quantizer.per_channel or quantizer.bits is None:
        return None
    # centered codes lie in [-(2^bits - 1), 2^bits - 1]
    return torch.int8 if quantizer.bits <= 7 else torch.int16 if quantizer.bits <= 15 else None


def _internal_dtypes(attn: nn.Module) -> tuple[torch.dtype | None, ...]:
    """Code dtypes of q, k, v and the probabilities (None: float values)."""
    if not isinstance(attn, QuantMultiheadAttention) or not attn.internals_quantized:
        return (None, None, None, None)
    names = ("q_quantizer", "k_quantizer", "v_quantizer", "probs_quantizer")
    return tuple(_code_dtype(getattr(attn, n)) for n in names)


def _attention(
    attn: nn.Module, x: torch.Tensor, mask: torch.Tensor, prefix: PrefixKV | None
) -> tuple[torch.Tensor, PrefixKV]:
    """Self-attention of ``x`` [B, R, E] that also attends to ``prefix`` (keys before x's).

    ``mask`` is the additive mask [R, P + R]. Returns the output and x's own keys/values.
    """
    b, length, width = x.shape
    (q, k, v), (s_q, s_k, s_v) = _heads(attn, x)
    d_q, d_k, d_v, d_p = _internal_dtypes(attn)
    head_dim = q.shape[-1]
    scores = _product("bhrd,bhkd->bhrk", q, k, (d_q, d_k))
    if prefix is not None:
        k_p, v_p, s_kp, s_vp = prefix
        if (s_kp, s_vp) != (s_k, s_v):
            raise RuntimeError("prefix and class positions were quantized on different grids")
        # the prefix is a batch of one: contract against it per head without copying it n times
        scores = torch.cat([_product("bhrd,hpd->bhrp", q, k_p[0], (d_q, d_k)), scores], dim=-1)
    scale = s_q * s_k * head_dim**-0.5
    scores = torch.add(mask.to(scores.dtype), scores, alpha=scale)  # mask + scale * scores
    probs, s_p = _probs(attn, scores.softmax(dim=-1))
    if prefix is not None:
        n_prefix = prefix[0].shape[-2]
        out = _product("bhrp,hpd->bhrd", probs[..., :n_prefix], prefix[1][0], (d_p, d_v))
        out = out + _product("bhrk,bhkd->bhrd", probs[..., n_prefix:], v, (d_p, d_v))
    else:
        out = _product("bhrk,bhkd->bhrd", probs, v, (d_p, d_v))
    out = _project_out(attn, out.transpose(1, 2).reshape(b, length, width), s_p * s_v)
    return out, (k, v, s_k, s_v)


def _probs(attn: nn.Module, probs: torch.Tensor) -> tuple[torch.Tensor, float]:
    if isinstance(attn, QuantMultiheadAttention):
        return attn.probs_codes(probs)
    return probs, 1.0


def _block(
    block: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    prefix: PrefixKV | None,
    attention_only: bool = False,
) -> tuple[torch.Tensor | None, PrefixKV]:
    """One open_clip ``ResidualAttentionBlock`` on batch-first ``x`` (plus a shared prefix)."""
    out, kv = _attention(block.attn, block.ln_1(x), mask, prefix)
    if attention_only:
        return None, kv
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), kv


def encode_prefix(
    blocks: Sequence[nn.Module], prefix: torch.Tensor, mask: torch.Tensor
) -> list[PrefixKV]:
    """Keys and values of every layer for the shared prefix ``[1, P, E]`` (batch first).

    ``mask`` is the tower's causal mask; the last layer's MLP is skipped (nothing reads it).
    """
    n_prefix = prefix.shape[1]
    causal = mask[:n_prefix, :n_prefix]
    kvs = []
    x: torch.Tensor | None = prefix
    for i, block in enumerate(blocks):
        assert x is not None
        x, kv = _block(block, x, causal, None, attention_only=i == len(blocks) - 1)
        kvs.append(kv)
    return kvs


def encode_rest(
    blocks: Sequence[nn.Module], x: torch.Tensor, mask: torch.Tensor, kvs: Sequence[PrefixKV]
) -> torch.Tensor:
    """Hidden states of the per-class positions ``[n, R, E]`` after every block.

    ``mask`` is the tower's causal mask; rows ``P .. P + R`` of it are what these positions see.
    """
    n_prefix, length = kvs[0][0].shape[-2], x.shape[1]
    rows = mask[n_prefix : n_prefix + length, : n_prefix + length]
    for block, kv in zip(blocks, kvs, strict=True):
        x, _ = _block(block, x, rows, kv)
        assert x is not None
    return x
