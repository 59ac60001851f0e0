"""Range observers: how a quantizer's clip range is chosen.

Weights are known tensors, so their range is computed in one call (:func:`weight_max_abs`).
Activations are seen batch by batch during calibration; :class:`ActivationObserver` keeps the
running min/max plus a bounded uniform random sample of values from *all* batches, which the
search-based observers (percentile, OMSE, MSE) score candidate ranges on. Every search is
vectorized over channels; the only Python loop is over candidate clip ratios.
"""

from __future__ import annotations

import torch

from p4q_lightning.quant.qmath import affine_qparams, symmetric_qmax

#: OMSE as the official P4Q code (after FQ-ViT) defines it: shrink min and max by (1 - 0.01 i).
OMSE_SHRINKS = tuple(1.0 - 0.01 * i for i in range(90))
#: The MSE search: a finer, wider grid of clip ratios.
MSE_SHRINKS = tuple(torch.linspace(1.0, 0.2, 161).tolist())
#: Values (not rows) the search observers keep; per channel, rows = SAMPLE_SIZE // channels.
SAMPLE_SIZE = 1 << 16
#: Values per step of the range search (candidates x sample), about 4 MB of float32.
SEARCH_BLOCK_VALUES = 1 << 20


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
        return quantile(absw, percentile / 100.0, dim=1)
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
        sample_size: values kept for the search observers (per channel: this many values
            spread over rows of all channels, i.e. ``sample_size // channels`` rows).
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
        # One entry per batch: (random rows of that batch, how many rows the batch had).
        self._strata: list[tuple[torch.Tensor, int]] = []
        self.rows_seen = 0
        self.batches = 0
        self._gen = torch.Generator().manual_seed(generator_seed)

    @property
    def needs_samples(self) -> bool:
        return self.observer != "minmax"

    @property
    def samples(self) -> list[torch.Tensor]:
        """The kept rows, per batch (each batch in proportion to its size once compacted)."""
        return [rows for rows, _ in self._strata]

    def _row_budget(self, channels: int) -> int:
        return max(self.sample_size // channels, 1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(-1, 1)
        lo, hi = observed_range(rows)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.batches += 1
        if not self.needs_samples:
            return
        budget = self._row_budget(rows.shape[1])
        n = rows.shape[0]
        if n > budget:
            rows = rows[torch.randperm(n, generator=self._gen)[:budget].to(rows.device)]
        self._strata.append((rows.cpu(), n))
        self.rows_seen += n
        if sum(r.shape[0] for r, _ in self._strata) > 2 * budget:
            self._compact(budget)

    def _compact(self, budget: int) -> None:
        """Keep ``budget`` rows in all, each batch's share proportional to its size.

        A batch's share only shrinks as more batches arrive and its kept rows are a uniform
        sample of it, so the result is a proportionally stratified uniform sample of every
        row seen, at bounded memory.
        """
        total = self.rows_seen
        compacted = []
        for rows, n in self._strata:
            share = min(rows.shape[0], max(round(budget * n / total), 1))
            if share < rows.shape[0]:
                rows = rows[torch.randperm(rows.shape[0], generator=self._gen)[:share]]
            compacted.append((rows, n))
        self._strata = compacted

    def sample(self) -> torch.Tensor:
        """The kept values, ``[rows, C]`` (per channel) or ``[rows, 1]``."""
        if not self._strata:
            raise RuntimeError("observer kept no sample: the minmax observer does not need one")
        self._compact(self._row_budget(self._strata[0][0].shape[1]))
        return torch.cat(self.samples, dim=0)

    def compute_range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the chosen (min, max), each of shape [C] (per channel) or [1]."""
        if self.min is None or self.max is None:
            raise RuntimeError(
                "observer saw no data: run calibration batches through the model first"
            )
        lo, hi = self.min.cpu(), self.max.cpu()
        if self.observer == "minmax":
            return lo, hi
        sample = self.sample()
        if self.observer == "percentile":
            q_hi = self.percentile / 100.0
            return quantile(sample, 1.0 - q_hi, dim=0), quantile(sample, q_hi, dim=0)
        shrinks = OMSE_SHRINKS if self.observer == "omse" else MSE_SHRINKS
        return _search_range(sample, lo, hi, bits, shrinks)


def observed_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (min, max) of ``[N, C]`` rows, each of shape ``[C]``.

    A single column is reduced flat: reducing an ``[N, 1]`` tensor along dim 0 takes torch's
    strided path, about 150x slower than ``aminmax`` on the flat tensor.
    """
    if rows.shape[1] == 1:
        lo, hi = torch.aminmax(rows.reshape(-1))
        return lo.reshape(1), hi.reshape(1)
    return rows.amin(dim=0), rows.amax(dim=0)


def quantile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) without its 16M-element input limit."""
    n = x.shape[dim]
    pos = q * (n - 1)
    below = int(pos)
    above = min(below + 1, n - 1)
    frac = pos - below
    lo = torch.kthvalue(x, below + 1, dim=dim).values
    if frac == 0.0 or above == below:
        return lo
    hi = torch.kthvalue(x, above + 1, dim=dim).values
    return lo + (hi - lo) * frac


def _search_range(
    sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, shrinks: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, per channel, the shrunk (min, max) pair with the lowest L2 error on the sample.

    Candidates are scored in blocks (one ``[block, rows, C]`` tensor per step), since many
    small ops cost more in thread synchronisation than in arithmetic. Ties keep the earlier
    (wider) candidate, so shrink 1.0, i.e. min-max, wins unless a narrower range is strictly
    better: the result is never worse than min-max on the sample.
    """
    factors = torch.tensor(shrinks, dtype=torch.float32)[:, None]
    cand_lo, cand_hi = lo[None] * factors, hi[None] * factors  # [S, C]
    scales, zps = affine_qparams(cand_lo, cand_hi, bits)
    qmax = 2**bits - 1
    block = max(1, SEARCH_BLOCK_VALUES // sample.numel())
    errors = []
    for i in range(0, len(shrinks), block):
        scale, zp = scales[i : i + block, None, :], zps[i : i + block, None, :]  # [b, 1, C]
        # fake_quant_reference_affine of every candidate at once, in place on one buffer
        buf = torch.div(sample[None], scale).add_(zp).round_().clamp_(0, qmax).sub_(zp).mul_(scale)
        errors.append(buf.sub_(sample[None]).square_().sum(dim=1))  # [b, C]
    best = torch.cat(errors).argmin(dim=0)  # first minimum: the widest equally good candidate
    channels = torch.arange(lo.numel())
    return cand_lo[best, channels], cand_hi[best, channels]
