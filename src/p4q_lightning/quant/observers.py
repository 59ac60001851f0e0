"""Range observers: how a quantizer's clip range is chosen.

Weights are known tensors, so their range is computed in one call (:func:`weight_max_abs`).
Activations are seen batch by batch during calibration; :class:`ActivationObserver` keeps the
running min/max plus a bounded random sample of values, which the search-based observers
(percentile, OMSE, MSE) score candidate ranges on. Every search is vectorized over channels;
the only Python loop is over candidate clip ratios.
"""

from __future__ import annotations

import torch

from p4q_lightning.quant.qmath import affine_qparams, fake_quant_reference_affine, symmetric_qmax

#: OMSE as the official P4Q code (after FQ-ViT) defines it: shrink min and max by (1 - 0.01 i).
OMSE_SHRINKS = tuple(1.0 - 0.01 * i for i in range(90))
#: The MSE search: a finer, wider grid of clip ratios.
MSE_SHRINKS = tuple(torch.linspace(1.0, 0.2, 161).tolist())
SAMPLE_SIZE = 1 << 18


def weight_max_abs(
    weight: torch.Tensor, bits: int, observer: str = "minmax", percentile: float = 99.99
) -> torch.Tensor:
    """Per-output-channel clip value for a symmetric weight quantizer (dim 0 = channel)."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    absw = w.abs()
    max_abs = absw.amax(dim=1)
    if observer == "minmax":
        return max_abs
    if observer == "percentile":
        return torch.quantile(absw, percentile / 100.0, dim=1)
    if observer == "mse":
        qmax = symmetric_qmax(bits)
        best = max_abs.clone()
        best_err = torch.full_like(max_abs, float("inf"))
        for shrink in MSE_SHRINKS:
            clip = (max_abs * shrink).clamp_min(1e-12)
            scale = (clip / qmax)[:, None]
            wq = (w / scale).round().clamp(-qmax, qmax) * scale
            err = (wq - w).pow(2).sum(dim=1)
            better = err < best_err
            best = torch.where(better, clip, best)
            best_err = torch.where(better, err, best_err)
        return best
    raise ValueError(f"unknown weight observer {observer!r}: use minmax, percentile or mse")


class ActivationObserver:
    """Accumulates activation statistics over calibration batches.

    Args:
        observer: ``minmax``, ``percentile``, ``omse`` or ``mse``.
        per_channel: keep ranges per last-dim channel instead of per tensor.
        percentile: upper percentile for the percentile observer (lower is 100 - it).
        sample_size: values (or rows, per channel) kept for the search observers.
    """

    def __init__(
        self,
        observer: str = "minmax",
        per_channel: bool = False,
        percentile: float = 99.99,
        sample_size: int = SAMPLE_SIZE,
        generator_seed: int = 0,
    ) -> None:
        if observer not in ("minmax", "percentile", "omse", "mse"):
            raise ValueError(
                f"unknown activation observer {observer!r}: use minmax, percentile, omse or mse"
            )
        self.observer = observer
        self.per_channel = per_channel
        self.percentile = percentile
        self.sample_size = sample_size
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.batches = 0
        self._gen = torch.Generator().manual_seed(generator_seed)

    @property
    def needs_samples(self) -> bool:
        return self.observer != "minmax"

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(-1, 1)
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.batches += 1
        if self.needs_samples and self.kept < self.sample_size:
            take = min(rows.shape[0], max(self.sample_size // 8, 1), self.sample_size - self.kept)
            idx = torch.randperm(rows.shape[0], generator=self._gen)[:take].to(rows.device)
            self.samples.append(rows[idx].cpu())
            self.kept += take

    def compute_range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the chosen (min, max), each of shape [C] (per channel) or [1]."""
        if self.min is None or self.max is None:
            raise RuntimeError("observer saw no data: run calibration batches through the model first")
        lo, hi = self.min.cpu(), self.max.cpu()
        if self.observer == "minmax":
            return lo, hi
        sample = torch.cat(self.samples, dim=0)
        if self.observer == "percentile":
            q_hi = self.percentile / 100.0
            return torch.quantile(sample, 1.0 - q_hi, dim=0), torch.quantile(sample, q_hi, dim=0)
        shrinks = OMSE_SHRINKS if self.observer == "omse" else MSE_SHRINKS
        return _search_range(sample, lo, hi, bits, shrinks)


def _search_range(
    sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, shrinks: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, per channel, the shrunk (min, max) pair with the lowest L2 error on the sample."""
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(lo, float("inf"))
    for shrink in shrinks:
        c_lo, c_hi = lo * shrink, hi * shrink
        scale, zp = affine_qparams(c_lo, c_hi, bits)
        xq = fake_quant_reference_affine(sample, scale, zp, 0, 2**bits - 1)
        err = (xq - sample).pow(2).sum(dim=0)
        better = err < best_err
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
        best_err = torch.where(better, err, best_err)
    return best_lo, best_hi
