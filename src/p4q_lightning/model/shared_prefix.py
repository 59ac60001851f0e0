"""Shared-prefix text encoding: the part of a prompt that every class shares runs once.

With a unified context and the class name after it, positions ``[SOS] ctx_1 .. ctx_n`` are the
same for every class. Under the causal mask their hidden states in every layer depend only on
themselves, so they are computed once (a batch of one) and each class runs only its own
positions (name, period, EOT), attending to the prefix's keys and values layer by layer. The
context's gradient flows through the one shared prefix.

The attention arithmetic is the one core (:func:`p4q_lightning.quant.attention.attend`), which
takes the prefix's keys and values; this module only walks the blocks.

This is exact, also for the quantized tower: every quantizer on the way is static and acts per
position (per tensor or per channel), so a position's codes do not depend on what it is batched
with; integer-coded q/k/v products are exact sums in float32. What can differ is float
summation order (a softmax over P + R keys instead of L with -inf entries), hence a code at a
rounding tie. :func:`supports_shared_prefix` says when the tower qualifies; otherwise callers
use the full path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from p4q_lightning.quant.attention import PrefixKV, attend
from p4q_lightning.quant.modules import attention_layer, runs_on_the_core
from p4q_lightning.quant.quantizer import ActivationQuantizer

__all__ = ["PrefixKV", "encode_prefix", "encode_rest", "supports_shared_prefix"]

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def _block_supported(block: nn.Module, training: bool) -> bool:
    if not all(hasattr(block, part) for part in _BLOCK_PARTS) or hasattr(block, "ln_1_kv"):
        return False  # not open_clip's ResidualAttentionBlock (custom or cross-attention blocks)
    return runs_on_the_core(block.attn, training)


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


def _block(
    block: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    prefix: PrefixKV | None,
    attention_only: bool = False,
    recompute_mlp: bool = False,
) -> tuple[torch.Tensor | None, PrefixKV]:
    """One open_clip ``ResidualAttentionBlock`` on batch-first ``x`` (plus a shared prefix);
    ``recompute_mlp``: see :func:`encode_rest`."""
    out, kv = attend(attention_layer(block.attn), block.ln_1(x), mask, prefix, compact=True)
    if attention_only:
        return None, kv
    x = x + block.ls_1(out)
    if not recompute_mlp:
        return x + block.ls_2(block.mlp(block.ln_2(x))), kv
    widen, project = _mlp_halves(block)
    hidden = checkpoint(_widen, block.ln_2, widen, x, use_reentrant=False)
    return x + block.ls_2(project(hidden)), kv


def _mlp_halves(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the MLP up to its output projection, the output projection): ``c_fc`` with the GELU,
    and ``c_proj``, for open_clip's ``nn.Sequential`` MLP; otherwise (the whole MLP, identity)."""
    mlp = block.mlp
    if isinstance(mlp, nn.Sequential) and len(mlp) >= 2:
        return mlp[:-1], mlp[-1]
    return mlp, nn.Identity()


def _widen(norm: nn.Module, widen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return widen(norm(x))


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
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    mask: torch.Tensor,
    kvs: Sequence[PrefixKV],
    recompute_mlp: bool = False,
) -> torch.Tensor:
    """Hidden states of the per-class positions ``[n, R, E]`` after every block.

    ``mask`` is the tower's causal mask; rows ``P .. P + R`` of it are what these positions see.
    ``recompute_mlp`` (activation checkpointing) keeps, in each block, only the MLP's input
    for the backward pass and recomputes its widening half there (LayerNorm, ``c_fc``, GELU):
    their saved activations (the GELU's input is four times the width) are about half of what
    a block keeps, for a third of its matmuls recomputed.
    """
    n_prefix, length = kvs[0][0].shape[-2], x.shape[1]
    rows = mask[n_prefix : n_prefix + length, : n_prefix + length]
    for block, kv in zip(blocks, kvs, strict=True):
        x, _ = _block(block, x, rows, kv, recompute_mlp=recompute_mlp)
        assert x is not None
    return x
