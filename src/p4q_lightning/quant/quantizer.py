"""Fake-quantizer modules: one per quantized tensor, with their parameters as buffers.

Buffers (scales, zero points, the calibrated flag) are part of the state dict, so a checkpoint
or an export carries the calibration; observers are transient and never saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from p4q_lightning.distributed import world
from p4q_lightning.quant.observers import ActivationObserver, observed_range, weight_max_abs
from p4q_lightning.quant.qmath import (
    affine_qparams,
    channel_shape,
    fake_quant,
    fake_quant_prepared,
    log2_quant,
    prepare_qparams,
    round_clamp,
    symmetric_scale,
    weight_code_range,
)


class NotCalibratedError(RuntimeError):
    """Raised when a quantized model is run before its activation ranges are known."""


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a tensor's current contents: storage, device and in-place version.

    None for inference tensors, which keep no version counter (nothing is cached for them).
    """
    try:
        return (t.data_ptr(), t.device, t._version)
    except RuntimeError:
        return None


class CachedBufferState(nn.Module):
    """Caches values derived from buffers (a flag, prepared fake-quant parameters).

    Reading a flag buffer with ``bool()`` on every forward is a host sync per quantizer on a
    GPU, and re-deriving the fake-quant parameters costs a few small kernels per call. The
    cache is keyed on each buffer's storage and version counter, so any in-place change
    (``fill_``, ``copy_``, ``load_state_dict``) or device move invalidates it by itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self._derived: dict[str, tuple[Any, Any]] = {}

    def cached(
        self, name: str, sources: tuple[torch.Tensor, ...], compute: Callable[[], Any]
    ) -> Any:
        keys = tuple(_tensor_key(t) for t in sources)
        hit = self._derived.get(name)
        if hit is not None and hit[0] == keys:
            return hit[1]
        value = compute()
        if None not in keys:
            self._derived[name] = (keys, value)
        return value

    def buffer_flag(self, name: str) -> bool:
        """``bool(self.<name>)``, read from the device only when the buffer changed."""
        buf = getattr(self, name)
        return self.cached(name, (buf,), lambda: bool(buf))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device / dtype moves
        self._derived.clear()
        return super()._apply(fn, recurse)


class WeightQuantizer(CachedBufferState):
    """Symmetric per-output-channel weight quantizer (dim 0 is the channel).

    Frozen weights are quantized once by :meth:`calibrate_from`; ``dynamic=True`` re-derives
    the scale on every call, for weights that train (the adapter) so they stay on the grid.
    ``grid`` is ``restricted`` or ``official`` (:data:`p4q_lightning.quant.qmath.WEIGHT_GRIDS`).
    """

    def __init__(
        self,
        bits: int | None,
        channels: int,
        observer: str = "minmax",
        percentile: float = 99.99,
        dynamic: bool = False,
        grid: str = "restricted",
    ) -> None:
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.percentile = percentile
        self.dynamic = dynamic
        self.grid = grid
        if bits is not None:
            weight_code_range(bits, grid)  # validates the grid name
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(bits is None))

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    @property
    def qmin(self) -> int:
        assert self.bits is not None
        return weight_code_range(self.bits, self.grid)[0]

    @property
    def qmax(self) -> int:
        assert self.bits is not None
        return weight_code_range(self.bits, self.grid)[1]

    def minmax_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-channel min-max scale of ``weight`` on this quantizer's grid (dynamic weights)."""
        max_abs = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
        return symmetric_scale(max_abs, self.bits, self.grid)

    @torch.no_grad()
    def calibrate_from(self, weight: torch.Tensor) -> None:
        if not self.enabled:
            return
        max_abs = weight_max_abs(weight, self.bits, self.observer, self.percentile, self.grid)
        self.scale.copy_(symmetric_scale(max_abs, self.bits, self.grid).to(self.scale.device))
        self.calibrated.fill_(True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.dynamic:
            with torch.no_grad():
                self.scale.copy_(self.minmax_scale(weight))
                self.calibrated.fill_(True)
        elif not self.buffer_flag("calibrated"):
            raise NotCalibratedError(
                "weight quantizer used before calibration: call p4q_lightning.calibrate(model, ...)"
            )
        return fake_quant(weight, self.scale, self.zero_point, self.qmin, self.qmax, axis=0)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of an (already quantized) weight, as int8."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        q = torch.round(weight.float() / self.scale.view(shape)).clamp(self.qmin, self.qmax)
        return q.to(torch.int8)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, observer={self.observer}, grid={self.grid}, dynamic={self.dynamic}"
        )


class ActivationQuantizer(CachedBufferState):
    """Asymmetric activation quantizer (per tensor, or per last-dim channel).

    Modes: ``quant`` (use stored range), ``observe`` (calibration: record statistics, pass the
    input through unchanged), ``ema`` (quantization-aware training: track the range with an
    exponential moving average while training, use it frozen in eval).

    ``channel_axis`` is the channel dim of per-channel ranges (-1; 1 for NCHW pixels),
    ``grid`` the activation grid (:data:`p4q_lightning.quant.qmath.ACT_GRIDS`) and
    ``score_on`` what the range search scores (``sample`` or ``last_batch``).
    """

    def __init__(
        self,
        bits: int | None,
        observer: str = "omse",
        per_channel: bool = False,
        channels: int = 1,
        percentile: float = 99.99,
        ema_momentum: float = 0.1,
        channel_axis: int = -1,
        grid: str = "zero_exact",
        score_on: str = "sample",
    ) -> None:
        super().__init__()
        self.bits = bits
        self.observer_name = observer
        self.per_channel = per_channel
        self.percentile = percentile
        self.ema_momentum = ema_momentum
        self.channel_axis = channel_axis
        self.grid = grid
        self.score_on = score_on
        self.mode = "quant"
        self._observer: ActivationObserver | None = None
        self.last_stats: dict[str, float] = {}
        n = channels if per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("range_min", torch.zeros(n))
        self.register_buffer("range_max", torch.zeros(n))
        self.register_buffer("calibrated", torch.tensor(bits is None))

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def start_observing(self) -> None:
        if self.enabled:
            self.mode = "observe"
            self._observer = ActivationObserver(
                self.observer_name,
                self.per_channel,
                self.percentile,
                channel_axis=self.channel_axis,
                score_on=self.score_on,
                bits=self.bits,
                grid=self.grid,
            )

    def score_next_batch(self) -> None:
        """Tell the observer that the coming batch is the last (``score_on='last_batch'``)."""
        if self._observer is not None:
            self._observer.score_next_batch()

    def abort_observing(self) -> None:
        """Drop what was observed (a calibration that failed); the range stays as it was."""
        self.mode, self._observer = "quant", None

    @torch.no_grad()
    def finish_observing(self) -> bool:
        """Fix the range from what was observed; returns False when nothing was seen."""
        if not self.enabled or self._observer is None:
            return True
        obs, self._observer, self.mode = self._observer, None, "quant"
        if obs.min is None:
            return False
        lo, hi = obs.compute_range(self.bits)
        self.set_range(lo, hi)
        clipped = obs.clip_ratio_of_scored_batch
        if obs.needs_samples:
            sample = obs.sample()
            clipped = float(((sample < lo) | (sample > hi)).float().mean())
        self.last_stats = {
            "min": float(lo.min()),
            "max": float(hi.max()),
            "scale": float(self.scale.mean()),
            "clip_ratio": clipped,
            "batches": float(obs.batches),
        }
        return True

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        device = self.scale.device
        lo, hi = lo.reshape(-1).to(device), hi.reshape(-1).to(device)
        scale, zp = affine_qparams(lo, hi, self.bits, self.grid)
        self.range_min.copy_(lo)
        self.range_max.copy_(hi)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp.to(torch.int32))
        self.calibrated.fill_(True)

    def check_ready(self, x: torch.Tensor) -> None:
        """EMA update while training in ``ema`` mode; otherwise require a calibrated range."""
        if self.mode == "ema" and self.training:
            self._ema_update(x)
        elif not self.buffer_flag("calibrated"):
            raise NotCalibratedError(
                "activation quantizer used before calibration: call "
                "p4q_lightning.calibrate(model, images=..., texts=...) before encoding"
            )

    def float_params(self) -> tuple[float, float, float, float]:
        """Per-tensor (1/scale, scale, qmin - z, qmax - z) as Python floats, cached."""

        def compute() -> tuple[float, float, float, float]:
            inv, scale, lo, hi = prepare_qparams(
                self.scale, self.zero_point, 0, 2**self.bits - 1, (1,)
            )
            return tuple(torch.cat([inv, scale, lo, hi]).tolist())  # one host read

        return self.cached("float_params", (self.scale, self.zero_point), compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x`` (quantize-dequantize), with a straight-through gradient."""
        if not self.enabled:
            return x
        if self.mode == "observe":
            self._observer.update(x)
            return x
        self.check_ready(x)
        if not self.per_channel:
            return fake_quant_prepared(x, *self.float_params())
        shape = channel_shape(x.dim(), self.channel_axis, self.scale.numel())
        params = self.cached(
            f"qparams{shape}",
            (self.scale, self.zero_point),
            lambda: prepare_qparams(self.scale, self.zero_point, 0, 2**self.bits - 1, shape),
        )
        return fake_quant_prepared(x, *params)

    def centered_codes(self, x: torch.Tensor, pre_scale: float = 1.0) -> tuple[torch.Tensor, float]:
        """``(c, s)`` with ``c * s`` equal to ``self(x * pre_scale)`` up to float rounding.

        On the per-tensor hot path ``c`` holds the centered integer codes and ``s`` is the
        scale, for the caller to fold into a scalar it applies anyway; ``pre_scale`` (a
        dequantization factor of ``x`` itself) is folded into the rounding step. When this
        quantizer is off, observing or per channel, ``c`` is the (fake-quantized) value and
        ``s`` is ``pre_scale`` or 1.
        """
        if not self.enabled:
            return x, pre_scale
        if self.mode == "observe" or self.per_channel:
            return self(x * pre_scale if pre_scale != 1.0 else x), 1.0
        self.check_ready(x * pre_scale if self.mode == "ema" and pre_scale != 1.0 else x)
        inv, scale, lo, hi = self.float_params()
        return round_clamp(x, inv * pre_scale, lo, hi), scale

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_channel and self.channel_axis % x.dim() != x.dim() - 1:
            x = x.movedim(self.channel_axis, -1)
        lo, hi = observed_range(
            x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(-1, 1)
        )
        lo, hi = _global_range(lo, hi)
        if self.buffer_flag("calibrated"):
            m = self.ema_momentum
            lo = (1 - m) * self.range_min + m * lo
            hi = (1 - m) * self.range_max + m * hi
        self.set_range(lo, hi)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, observer={self.observer_name}, per_channel={self.per_channel}, "
            f"grid={self.grid}, score_on={self.score_on}"
        )


def _global_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The range over every rank's batch under DDP (one all-reduce), so that N ranks with B
    samples each update the EMA exactly as one process with N x B samples does."""
    if world()[1] == 1:
        return lo, hi
    both = torch.cat([-lo.reshape(-1), hi.reshape(-1)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = lo.numel()
    return -both[:n].reshape(lo.shape), both[n:].reshape(hi.shape)


class Log2Quantizer(nn.Module):
    """Log2 quantizer for post-softmax probabilities; its range [0, 1] needs no calibration."""

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = bits
        self.mode = "quant"
        self.last_stats: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def start_observing(self) -> None:  # nothing to observe
        pass

    def finish_observing(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bits is None else log2_quant(x, self.bits)

    def centered_codes(self, x: torch.Tensor, pre_scale: float = 1.0) -> tuple[torch.Tensor, float]:
        """Same contract as :meth:`ActivationQuantizer.centered_codes`: ``c * s == self(x)``."""
        if pre_scale != 1.0:
            x = x * pre_scale
        return self(x), 1.0

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
