"""Range observers: how a quantizer's clip range is chosen.

Weights are known tensors, so their range is computed in one call (:func:`weight_max_abs`).
Activations are seen batch by batch during calibration; :class:`ActivationObserver` keeps the
running min/max plus a bounded uniform random sample of values from *all* batches, which the
search-based observers (percentile, OMSE, MSE) score candidate ranges on, or (``score_on=
"last_batch"``, the official code's choice) scores them on the whole last batch as it passes.
Every search is vectorized over channels; the only Python loop is over candidate clip ratios.

OMSE per channel keeps one shrink factor for all channels, chosen by the total error, as the
official code does: a factor per channel, chosen on the few rows a bounded sample holds per
channel (20-128 for 512-3,072 channels), overfits those rows and clips far too much.
"""

from __future__ import annotations

import torch

from p4q_lightning.quant.qmath import affine_qparams, symmetric_scale, weight_code_range

#: OMSE as the official P4Q code (after FQ-ViT) defines it: shrink min and max by (1 - 0.01 i).
OMSE_SHRINKS = tuple(1.0 - 0.01 * i for i in range(90))
#: The MSE search: a finer, wider grid of clip ratios.
MSE_SHRINKS = tuple(torch.linspace(1.0, 0.2, 161).tolist())
#: Values (not rows) the search observers keep; per channel, rows = SAMPLE_SIZE // channels.
SAMPLE_SIZE = 1 << 16
#: Values per step of the range search (candidates x sample), about 4 MB of float32.
SEARCH_BLOCK_VALUES = 1 << 20


def weight_max_abs(
    weight: torch.Tensor,
    bits: int,
    observer: str = "minmax",
    percentile: float = 99.99,
    grid: str = "restricted",
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
        qmin, qmax = weight_code_range(bits, grid)
        best = max_abs.clone()
        best_err = torch.full_like(max_abs, float("inf"))
        for shrink in MSE_SHRINKS:
            clip = (max_abs * shrink).clamp_min(1e-12)
            scale = symmetric_scale(clip, bits, grid)[:, None]
            wq = (w / scale).round().clamp(qmin, qmax) * scale
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
        channel_axis: the channel dim of the observed tensors (per channel only).
        score_on: ``sample`` or ``last_batch``: what the search observers score on. With
            ``last_batch``, :meth:`score_next_batch` marks the batch to score; the range is
            searched as that batch passes (with min/max over all batches so far) and no
            sample is kept.
        bits, grid: the activation grid the search scores (needed for ``last_batch``).
    """

    def __init__(
        self,
        observer: str = "minmax",
        per_channel: bool = False,
        percentile: float = 99.99,
        sample_size: int = SAMPLE_SIZE,
        generator_seed: int = 0,
        channel_axis: int = -1,
        score_on: str = "sample",
        bits: int | None = None,
        grid: str = "zero_exact",
    ) -> None:
        if observer not in ("minmax", "percentile", "omse", "mse"):
            raise ValueError(
                f"unknown activation observer {observer!r}: use minmax, percentile, omse or mse"
            )
        if score_on not in ("sample", "last_batch"):
            raise ValueError(f"score_on={score_on!r}: use sample or last_batch")
        if score_on == "last_batch" and bits is None:
            raise ValueError("score_on='last_batch' needs the bit width: pass bits=")
        self.observer = observer
        self.per_channel = per_channel
        self.percentile = percentile
        self.sample_size = sample_size
        self.channel_axis = channel_axis
        self.score_on = score_on
        self.bits = bits
        self.grid = grid
        self.score_this_batch = False
        self._scored: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scored_clip_ratio = 0.0
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        # One entry per batch: (random rows of that batch, how many rows the batch had).
        self._strata: list[tuple[torch.Tensor, int]] = []
        self.rows_seen = 0
        self.batches = 0
        self._gen = torch.Generator().manual_seed(generator_seed)

    @property
    def needs_samples(self) -> bool:
        return self.observer != "minmax" and self.score_on == "sample"

    def score_next_batch(self) -> None:
        """Mark the coming batch as the last one: the search scores its values."""
        self.score_this_batch = True

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` rows of ``x`` (per channel, channels last) or ``[N, 1]`` (per tensor)."""
        if not self.per_channel:
            return x.reshape(-1, 1)
        if self.channel_axis % x.dim() != x.dim() - 1:
            x = x.movedim(self.channel_axis, -1)
        return x.reshape(-1, x.shape[-1])

    @property
    def samples(self) -> list[torch.Tensor]:
        """The kept rows, per batch (each batch in proportion to its size once compacted)."""
        return [rows for rows, _ in self._strata]

    def _row_budget(self, channels: int) -> int:
        return max(self.sample_size // channels, 1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = self._rows(x)
        lo, hi = observed_range(rows)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.batches += 1
        if self.score_this_batch and self.observer != "minmax" and self.score_on == "last_batch":
            self._scored = self._search(rows, self.min, self.max, self.bits)
            scored_lo, scored_hi = self._scored
            outside = (rows < scored_lo) | (rows > scored_hi)
            self._scored_clip_ratio = float(outside.float().mean())
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
        if self.score_on == "last_batch":
            if self._scored is None:
                raise RuntimeError(
                    "score_on='last_batch' but no batch was marked as the last one: call "
                    "score_next_batch() before it (p4q_lightning.calibrate does)"
                )
            return self._scored[0].cpu(), self._scored[1].cpu()
        return self._search(self.sample(), lo, hi, bits)

    @property
    def clip_ratio_of_scored_batch(self) -> float:
        """Fraction of the last batch's values outside the chosen range (``last_batch``)."""
        return self._scored_clip_ratio

    def _search(
        self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observer == "percentile":
            q_hi = self.percentile / 100.0
            return quantile(rows, 1.0 - q_hi, dim=0), quantile(rows, q_hi, dim=0)
        shrinks = OMSE_SHRINKS if self.observer == "omse" else MSE_SHRINKS
        shared = self.observer == "omse"
        return _search_range(rows, lo, hi, bits, shrinks, shared=shared, grid=self.grid)


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
    sample: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    shrinks: tuple[float, ...],
    shared: bool = False,
    grid: str = "zero_exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the shrunk (min, max) pair with the lowest L2 error on the sample.

    Per channel, or (``shared``) one shrink factor for all channels, chosen by the error
    summed over channels. Candidates are scored in blocks (one ``[block, rows, C]`` tensor per
    step), since many small ops cost more in thread synchronisation than in arithmetic. Ties
    keep the earlier (wider) candidate, so shrink 1.0, i.e. min-max, wins unless a narrower
    range is strictly better: the result is never worse than min-max on the sample.
    """
    sample, lo, hi = sample.to(lo.device), lo.float(), hi.float()
    factors = torch.tensor(shrinks, dtype=torch.float32, device=lo.device)[:, None]
    cand_lo, cand_hi = lo[None] * factors, hi[None] * factors  # [S, C]
    scales, zps = affine_qparams(cand_lo, cand_hi, bits, grid)
    qmax = 2**bits - 1
    block = max(1, SEARCH_BLOCK_VALUES // sample.numel())
    errors = []
    for i in range(0, len(shrinks), block):
        scale, zp = scales[i : i + block, None, :], zps[i : i + block, None, :]  # [b, 1, C]
        # fake_quant_reference_affine of every candidate at once, in place on one buffer
        buf = torch.div(sample[None], scale).add_(zp).round_().clamp_(0, qmax).sub_(zp).mul_(scale)
        errors.append(buf.sub_(sample[None]).square_().sum(dim=1))  # [b, C]
    error = torch.cat(errors)  # [S, C]
    channels = torch.arange(lo.numel(), device=lo.device)
    if shared:  # first minimum: the widest equally good candidate
        best = error.double().sum(dim=1).argmin().expand(lo.numel())
    else:
        best = error.argmin(dim=0)
    return cand_lo[best, channels], cand_hi[best, channels]
