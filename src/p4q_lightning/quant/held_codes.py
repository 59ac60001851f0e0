"""A frozen quantized weight held as integer codes and per-channel scales instead of float.

A calibrated layer stores its weight as float values on the quantization grid: ``code * scale``
per output channel (:meth:`~p4q_lightning.quant.modules.QuantizedWeightMixin.freeze_weights`).
While a fit trains from cached features the student's text tower is the only frozen tower a
step reads, and holding its weights as int8 codes takes a quarter of the memory. A layer is
held only when ``codes.float() * scale`` reproduces the stored float weight bit for bit, so
everything computed from the held weight is bitwise what the float weight gives.

The step dequantizes each weight just before its matmul and drops it after. Autograd would keep
that float weight for the backward pass (the input's gradient needs it) of every layer at once,
so :meth:`HeldCodes.weight` packs the tensors autograd saves from it as the codes again
(:func:`torch.autograd.graph.saved_tensors_hooks`) and dequantizes them when the backward pass
unpacks them: the backward formulas stay torch's own, and no float copy outlives its layer.
(Under ``bf16-mixed`` autocast the matmul casts the weight to bfloat16 first and autograd
keeps that cast, as it does without codes: only float32 weights are packed.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

#: int8 holds the codes of every grid up to 8 bits; int16 those up to 16
CODE_DTYPES = (torch.int8, torch.int16)


@dataclass(frozen=True)
class _SavedView:
    """A tensor autograd saved that is a view of a held layer's dequantized weight."""

    held: HeldCodes
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class HeldCodes:
    """``codes`` (centered integer codes, ``[out, ...]``) and ``scale`` (float, broadcastable
    to the codes: one per output channel) of a frozen weight."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))

    def dequantize(self) -> torch.Tensor:
        """The float weight, ``codes * scale`` computed as the quantizer computes it."""
        return self.codes.to(self.scale.dtype).mul_(self.scale)

    @contextmanager
    def weight(self) -> Iterator[torch.Tensor]:
        """The dequantized weight, for the matmul computed inside this context; what autograd
        saves from it is held as the codes (see the module docstring)."""
        weight = self.dequantize()
        storage = weight.untyped_storage().data_ptr()

        def pack(t: torch.Tensor) -> Any:
            if t.untyped_storage().data_ptr() != storage:
                return t
            return _SavedView(self, tuple(t.size()), tuple(t.stride()), t.storage_offset())

        def unpack(saved: Any) -> torch.Tensor:
            if not isinstance(saved, _SavedView):
                return saved
            w = saved.held.dequantize()
            return w.as_strided(saved.size, saved.stride, saved.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield weight


def hold_codes(weight: torch.Tensor, scale: torch.Tensor) -> HeldCodes | None:
    """``weight`` (values on a grid of per-output-channel ``scale``) as codes, or None when the
    codes do not reproduce every bit of it (or do not fit in 16 bits)."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = scale.detach().to(weight.dtype).reshape(shape).clone()
    with torch.no_grad():
        codes = torch.round(weight * scale.reciprocal())
        if codes.numel() == 0:
            return None
        lo, hi = float(codes.min()), float(codes.max())
        fits = [d for d in CODE_DTYPES if torch.iinfo(d).min <= lo <= hi <= torch.iinfo(d).max]
        if not fits:
            return None
        held = HeldCodes(codes.to(fits[0]), scale)
        if not _same_bits(held.dequantize(), weight):
            return None
    return held


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (``torch.equal`` takes -0.0 for 0.0; NaN never equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))
