"""CLIP-LoRA's low-rank q/k/v updates as a module in the attention's ``in_proj`` slot.

:class:`LoRAInProj` holds the frozen packed projection (a ``QuantLinear`` of the PTQ student, or
its float copy with ``quant: fp``) and adds ``alpha / r * B(A(dropout(x)))`` per q, k and v, so
the one attention core (:mod:`p4q_lightning.quant.attention`) runs it unchanged: the attention
arithmetic is not duplicated. The factors stay float (the deployment form is a float side
branch beside the integer weights); B starts at zero, so the wrapped student starts equal to the
PTQ student. Gradients reach earlier layers through the frozen quantized projections with the
straight-through estimator the quantizers already use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.quant.modules import QuantMultiheadAttention


class LoRAInProj(nn.Module):
    """``base(x) + scale * [B_q A_q x | B_k A_k x | B_v A_v x]`` (x after dropout in training).

    ``lora_A`` is ``[3, r, E]`` (Kaiming-uniform as loralib), ``lora_B`` is ``[3, E, r]``
    (zeros). ``enabled`` off gives the base projection alone (the PTQ row of a comparison).
    """

    def __init__(
        self, base: nn.Module, embed_dim: int, rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_A = nn.Parameter(torch.empty(3, rank, embed_dim))
        self.lora_B = nn.Parameter(torch.zeros(3, embed_dim, rank))
        for i in range(3):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        h = h.to(self.lora_A.dtype)
        # q, k, v each: a rank-r projection down (A) and back up (B), concatenated as in_proj's
        delta = torch.cat(
            [F.linear(F.linear(h, self.lora_A[p]), self.lora_B[p]) for p in range(3)], dim=-1
        )
        return out + (delta * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The packed ``[3E, E]`` weight update ``scale * B A`` (for merging)."""
        return ((self.lora_B @ self.lora_A) * self.scale).flatten(0, 1)


def install_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator
) -> int:
    """Wrap the ``in_proj`` of every attention layer of ``model`` (both towers); returns how
    many. ``model`` must be a quantized copy (``quantize(teacher, spec)``, ``fp`` included)."""
    count = 0
    for attn in model.modules():
        if isinstance(attn, QuantMultiheadAttention) and not isinstance(attn.in_proj, LoRAInProj):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                attn.in_proj = LoRAInProj(attn.in_proj, attn.embed_dim, rank, alpha, dropout)
            count += 1
    if count == 0:
        raise ValueError("CLIP-LoRA found no attention layer to wrap in the student")
    return count


def lora_layers(model: nn.Module) -> list[LoRAInProj]:
    """Every LoRA wrapper of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRAInProj)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable factors of every wrapper (A and B of each layer)."""
    return [p for layer in lora_layers(model) for p in (layer.lora_A, layer.lora_B)]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The student without its LoRA terms inside the block (the PTQ student)."""
    layers = lora_layers(model)
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, on in zip(layers, before, strict=True):
            layer.enabled = on
