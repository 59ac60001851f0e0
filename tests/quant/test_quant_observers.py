"""Observers on known distributions."""

from __future__ import annotations

import pytest
import torch

from p4q_lightning.quant.observers import SAMPLE_SIZE, ActivationObserver, quantile, weight_max_abs
from p4q_lightning.quant.qmath import affine_qparams, fake_quant, symmetric_scale


def _dist(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "gaussian":
        return torch.randn(n, generator=g)
    if name == "laplace":  # heavy tails: min-max wastes most of the grid on a few values
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if name == "skewed":  # post-GELU-like: long positive tail, short negative side
        x = torch.randn(n, generator=g) * 2
        return torch.nn.functional.gelu(x)
    if name == "uniform":
        return torch.rand(n, generator=g) * 4 - 1
    raise ValueError(name)


def _l2(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> float:
    scale, zp = affine_qparams(lo, hi, bits)
    per_channel = lo.numel() > 1
    y = fake_quant(x, scale, zp.int(), 0, 2**bits - 1, axis=-1 if per_channel else None)
    return float((y.double() - x.double()).pow(2).sum())


def _observe(kind: str, data: torch.Tensor, batches: int = 4, **kw: object) -> ActivationObserver:
    obs = ActivationObserver(kind, **kw)  # type: ignore[arg-type]
    for chunk in data.chunk(batches):
        obs.update(chunk)
    return obs


@pytest.mark.parametrize("dist", ["gaussian", "laplace", "skewed", "uniform"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["omse", "mse"])
def test_search_observers_never_worse_than_minmax(dist: str, bits: int, kind: str) -> None:
    data = _dist(dist, 40_000)  # below SAMPLE_SIZE: the search scores the whole data
    minmax = _observe("minmax", data).compute_range(bits)
    searched = _observe(kind, data).compute_range(bits)
    assert _l2(data, *searched, bits) <= _l2(data, *minmax, bits)


@pytest.mark.parametrize("kind", ["omse", "mse"])
def test_search_observers_clip_heavy_tails_at_low_bits(kind: str) -> None:
    data = _dist("laplace", 40_000)
    lo, hi = _observe(kind, data).compute_range(4)
    assert hi < data.max() and lo > data.min()
    assert _l2(data, lo, hi, 4) < 0.7 * _l2(data, data.min().view(1), data.max().view(1), 4)


def test_omse_uses_the_official_shrink_grid() -> None:
    """OMSE candidates are (min, max) * (1 - 0.01 i), i = 0..89: the result is one of them."""
    data = _dist("laplace", 20_000)
    lo, hi = _observe("omse", data).compute_range(4)
    ratio = float(hi / data.max())
    assert ratio == pytest.approx(float(lo / data.min()), rel=1e-6)
    i = round((1 - ratio) / 0.01)
    assert 0 <= i < 90 and ratio == pytest.approx(1 - 0.01 * i, abs=1e-6)


def test_omse_per_channel_is_never_worse_than_minmax_in_total() -> None:
    """Per channel, OMSE shares one shrink factor chosen by the total error (the official
    rule), so the total over channels is never worse than min-max (factor 1 is a candidate)."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(4000, 6, generator=g) * torch.tensor([0.1, 1.0, 5.0, 1.0, 2.0, 0.5])
    data[:, 3] = _dist("laplace", 4000)
    mm = _observe("minmax", data, per_channel=True)
    om = _observe("omse", data, per_channel=True)
    (mm_lo, mm_hi), (om_lo, om_hi) = mm.compute_range(4), om.compute_range(4)
    assert _l2(data, om_lo, om_hi, 4) <= _l2(data, mm_lo, mm_hi, 4)
    ratios = om_hi / mm_hi
    assert torch.allclose(ratios, ratios[0].expand(6)) and float(ratios[0]) < 1.0


def test_percentile_clips_a_planted_outlier() -> None:
    data = _dist("gaussian", 50_000)
    data[123] = 1000.0
    data[4567] = -800.0
    lo, hi = _observe("percentile", data, percentile=99.99).compute_range(8)
    assert 3.0 < float(hi) < 6.0 and -6.0 < float(lo) < -3.0
    mlo, mhi = _observe("minmax", data).compute_range(8)
    assert float(mhi) == 1000.0 and float(mlo) == -800.0


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_weight_observer_beats_minmax(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-2, 0, 64)[:, None]
    qmax = 2 ** (bits - 1) - 1

    def row_err(max_abs: torch.Tensor) -> torch.Tensor:
        scale = symmetric_scale(max_abs, bits)[:, None]
        return ((w / scale).round().clamp(-qmax, qmax) * scale - w).pow(2).sum(dim=1)

    mse, minmax = (
        row_err(weight_max_abs(w, bits, "mse")),
        row_err(weight_max_abs(w, bits, "minmax")),
    )
    assert (mse <= minmax).all()
    if bits == 4:
        assert mse.sum() < 0.9 * minmax.sum()


def test_weight_percentile_observer_clips_outliers_per_row() -> None:
    w = torch.randn(8, 20_000, generator=torch.Generator().manual_seed(0))
    w[2, 5] = 50.0
    clip = weight_max_abs(w, 4, "percentile", percentile=99.9)
    assert clip[2] < 5.0
    assert torch.allclose(clip, torch.quantile(w.abs(), 0.999, dim=1), rtol=1e-5)


def test_quantile_matches_torch_quantile_in_float64() -> None:
    x = torch.randn(1001, 7, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.013, 0.5, 0.9999, 1.0):
        expected = torch.quantile(x.double(), q, dim=0)
        torch.testing.assert_close(quantile(x, q, dim=0).double(), expected, rtol=3e-7, atol=0)
        torch.testing.assert_close(quantile(x.double(), q, dim=0), expected, rtol=1e-12, atol=0)


def test_sample_covers_every_batch_in_proportion() -> None:
    """The search scores a uniform sample of all batches, not just the first few."""
    obs = ActivationObserver("omse")
    n_batches, rows = 12, 30_000  # 360k values, well above SAMPLE_SIZE
    for i in range(n_batches):
        obs.update(torch.full((rows,), float(i)) + torch.rand(rows) * 0.5)
    sample = obs.sample().flatten()
    counts = torch.bincount(sample.floor().long(), minlength=n_batches)
    assert sample.numel() == pytest.approx(SAMPLE_SIZE, rel=0.01)
    expected = SAMPLE_SIZE / n_batches
    assert (counts - expected).abs().max() <= 2


def test_per_channel_sample_memory_is_bounded_by_values_not_rows() -> None:
    obs = ActivationObserver("percentile", per_channel=True)
    for _ in range(10):
        obs.update(torch.randn(6_400, 768))  # e.g. 128 images x 50 tokens, ViT-B width
        assert sum(s.numel() for s in obs.samples) <= 2 * SAMPLE_SIZE + 768 * 2
    assert obs.sample().numel() <= SAMPLE_SIZE + 768 * 10
    lo, hi = obs.compute_range(8)
    assert lo.shape == hi.shape == (768,)


def test_observer_validation() -> None:
    with pytest.raises(ValueError, match="unknown activation observer"):
        ActivationObserver("histogram")
    with pytest.raises(RuntimeError, match="saw no data"):
        ActivationObserver("omse").compute_range(8)
