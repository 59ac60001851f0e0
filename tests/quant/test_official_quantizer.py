"""The official P4Q quantizer's rules (``p4q-official``), each checked on small tensors against
values worked out by hand from the rules (docs/official_quantizer.md), not against our code."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import build_tiny_clip
from torch import nn

from p4q_lightning import calibrate, get_spec, quantize
from p4q_lightning.quant import ALL_GROUPS, GroupSpec, QuantConv2d, WeightQuantizer
from p4q_lightning.quant.observers import OMSE_SHRINKS, ActivationObserver
from p4q_lightning.quant.qmath import affine_qparams, fake_quant

# ----------------------------------------------------------------------------- weight grid


def test_official_weight_grid_4bit_by_hand() -> None:
    """scale = max|w| / 7.5, codes -8..7: +max|w| (7.5 steps) rounds to 8 and clips to 7."""
    w = torch.tensor([[1.5, -1.5, 0.33, -0.75], [0.3, 0.0, -0.29, 0.11]])
    wq = WeightQuantizer(4, 2, grid="official")
    wq.calibrate_from(w)
    assert torch.allclose(wq.scale, torch.tensor([0.2, 0.04]))
    expected = torch.tensor([[1.4, -1.6, 0.4, -0.8], [0.28, 0.0, -0.28, 0.12]])
    assert torch.allclose(wq(w), expected, atol=1e-6)
    assert wq.codes(w).tolist() == [[7, -8, 2, -4], [7, 0, -7, 3]]


def test_official_weight_grid_8bit_by_hand() -> None:
    """scale = max|w| / 127.5, codes -128..127."""
    w = torch.tensor([[2.55, -2.55, 1.0]])
    wq = WeightQuantizer(8, 1, grid="official")
    wq.calibrate_from(w)
    assert float(wq.scale) == pytest.approx(0.02)
    assert wq.codes(w).tolist() == [[127, -128, 50]]


def test_restricted_weight_grid_by_hand() -> None:
    """The default grid: scale = max|w| / 7, codes -7..7 (both ends of the range are codes)."""
    w = torch.tensor([[1.4, -1.4, 0.33]])
    wq = WeightQuantizer(4, 1)
    wq.calibrate_from(w)
    assert float(wq.scale) == pytest.approx(0.2)
    assert wq.codes(w).tolist() == [[7, -7, 2]]


# ------------------------------------------------------------------------- activation grid


def test_official_activation_grid_keeps_a_range_without_zero() -> None:
    """Range [0.5, 2] at 2 bits: scale 1.5/3 = 0.5, zero point round(-1) clamped to 0, so the
    codes are {0, 0.5, 1, 1.5} (the official rule); zero_exact widens to [0, 2] instead."""
    lo, hi = torch.tensor([0.5]), torch.tensor([2.0])
    scale, zp = affine_qparams(lo, hi, 2, "official")
    assert float(scale) == 0.5 and float(zp) == 0.0
    x = torch.tensor([0.4, 0.9, 2.0])
    assert fake_quant(x, scale, zp, 0, 3).tolist() == [0.5, 1.0, 1.5]
    scale, zp = affine_qparams(lo, hi, 2, "zero_exact")
    assert float(scale) == pytest.approx(2 / 3) and float(zp) == 0.0


def test_activation_grids_agree_when_the_range_holds_zero() -> None:
    """[-1, 2] at 2 bits: scale 1, zero point 1 under both rules."""
    for grid in ("official", "zero_exact"):
        scale, zp = affine_qparams(torch.tensor([-1.0]), torch.tensor([2.0]), 2, grid)
        assert float(scale) == 1.0 and float(zp) == 1.0


# ----------------------------------------------------------------- OMSE, last-batch scoring


def _two_batches(channel_gain: torch.Tensor) -> list[torch.Tensor]:
    """Batch 1 holds 0 and an outlier 20 (it sets the running max); batch 2 holds 0, 1, 2, 3.
    Columns are scaled by ``channel_gain``."""
    first = torch.tensor([[0.0], [20.0]]) * channel_gain
    last = torch.tensor([[0.0], [1.0], [2.0], [3.0]]).repeat(8, 1) * channel_gain
    return [first, last]


def _observe_batches(obs: ActivationObserver, batches: list[torch.Tensor]) -> None:
    for i, batch in enumerate(batches):
        if i == len(batches) - 1:
            obs.score_next_batch()
        obs.update(batch)


def test_omse_scores_the_last_batch_by_hand() -> None:
    """Running range [0, 20]; at 2 bits the last batch {0,1,2,3} is exact only with scale 1,
    i.e. shrink 0.15 (i = 85): range [0, 3]. Any other candidate has a nonzero error."""
    obs = ActivationObserver("omse", score_on="last_batch", bits=2, grid="official")
    _observe_batches(obs, _two_batches(torch.ones(1)))
    lo, hi = obs.compute_range(2)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(3.0, abs=1e-5)
    assert obs.clip_ratio_of_scored_batch == 0.0


def test_omse_on_a_sample_of_all_batches_keeps_the_outlier() -> None:
    """Scored on every batch, shrink 0.15 costs (20 - 3)^2 = 289 on the outlier, more than the
    rounding error of full range (grid step 20/3: at most 14 per copy of {1, 2, 3})."""
    obs = ActivationObserver("omse", grid="official")
    for batch in _two_batches(torch.ones(1)):
        obs.update(batch)
    _, hi = obs.compute_range(2)
    assert float(hi) > 3.5


def test_per_channel_omse_shares_one_shrink_factor_by_hand() -> None:
    """Channels scaled 1 and 2: the shared factor 0.15 makes both exact: [0, 3] and [0, 6]."""
    obs = ActivationObserver(
        "omse", per_channel=True, score_on="last_batch", bits=2, grid="official"
    )
    _observe_batches(obs, _two_batches(torch.tensor([1.0, 2.0])))
    lo, hi = obs.compute_range(2)
    assert lo.tolist() == [0.0, 0.0]
    assert hi.tolist() == pytest.approx([3.0, 6.0], abs=1e-5)


def _official_omse_reference(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> torch.Tensor:
    """The rule written out plainly: for i = 0..89 shrink every channel's (min, max) by
    (1 - 0.01 i), quantize all rows, keep the first i with the least total squared error."""
    qmax = 2**bits - 1
    best_i, best_err = 0, float("inf")
    for i in range(90):
        f = 1.0 - 0.01 * i
        new_lo, new_hi = lo * f, hi * f
        scale = ((new_hi - new_lo) / qmax).clamp_min(1e-12)
        zp = (-new_lo / scale).round().clamp(0, qmax)
        xq = ((rows / scale + zp).round().clamp(0, qmax) - zp) * scale
        err = float((xq.double() - rows.double()).pow(2).sum())
        if err < best_err:
            best_i, best_err = i, err
    return torch.tensor(1.0 - 0.01 * best_i)


def test_per_channel_omse_matches_the_plain_rule_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    gains = torch.tensor([0.1, 1.0, 4.0, 0.5, 2.0])
    batches = [torch.randn(64, 5, generator=g) * gains for _ in range(3)]
    batches[0][3, 2] = 30.0  # an outlier in an early batch
    obs = ActivationObserver(
        "omse", per_channel=True, score_on="last_batch", bits=4, grid="official"
    )
    _observe_batches(obs, batches)
    lo, hi = obs.compute_range(4)
    all_rows = torch.cat(batches)
    run_lo, run_hi = all_rows.amin(dim=0), all_rows.amax(dim=0)
    f = _official_omse_reference(batches[-1], run_lo, run_hi, 4)
    assert torch.allclose(lo, run_lo * f) and torch.allclose(hi, run_hi * f)
    assert any(float(f) == pytest.approx(s) for s in OMSE_SHRINKS)


def test_per_channel_omse_is_not_worse_than_per_tensor() -> None:
    """3,072 Gaussian channels of varied scale (a c_proj input): per channel with one shared
    factor beats one range for the tensor. A factor per channel, picked on the ~21 rows per
    channel a 65,536-value sample holds, clipped most channels to about half their range."""
    g = torch.Generator().manual_seed(0)
    gains = torch.rand(3072, generator=g) * 2 + 0.2
    data = torch.randn(256, 3072, generator=g) * gains
    errors = {}
    for per_channel in (False, True):
        obs = ActivationObserver("omse", per_channel=per_channel)
        for chunk in data.chunk(4):
            obs.update(chunk)
        lo, hi = obs.compute_range(8)
        scale, zp = affine_qparams(lo, hi, 8)
        xq = fake_quant(data, scale, zp, 0, 255, axis=-1 if per_channel else None)
        errors[per_channel] = float((xq - data).norm() / data.norm())
    assert errors[True] <= errors[False]
    assert errors[True] < 0.02


# ---------------------------------------------------------------------- pixel input per RGB


def test_pixel_input_has_one_range_per_rgb_channel_by_hand() -> None:
    """2 bits, ranges R [0, 3], G [0, 6], B [-3, 0]: scales 1, 2, 1; zero points 0, 0, 3.
    1.4 in R -> 1; 1.4 in G -> 0.7 steps -> 1 -> 2; -1.4 in B -> -1."""
    conv = nn.Conv2d(3, 4, kernel_size=2, stride=2)
    spec = GroupSpec(w_bits=4, a_bits=2, a_observer="minmax", a_per_channel=True)
    layer = QuantConv2d(conv, spec, "vision.patch_embed")
    q = layer.input_quantizer
    assert q.scale.shape == (3,)
    pixels = torch.zeros(2, 3, 4, 4)
    pixels[0, 0, 0, 0], pixels[1, 1, 2, 3], pixels[0, 2, 1, 1] = 3.0, 6.0, -3.0
    q.start_observing()
    q(pixels)
    q.finish_observing()
    assert q.range_min.tolist() == [0.0, 0.0, -3.0] and q.range_max.tolist() == [3.0, 6.0, 0.0]
    assert q.scale.tolist() == [1.0, 2.0, 1.0] and q.zero_point.tolist() == [0, 0, 3]
    x = torch.tensor([1.4, 1.4, -1.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert q(x)[0, :, 0, 0].tolist() == pytest.approx([1.0, 2.0, -1.0])


# -------------------------------------------------------------- float-weight calibration


def _minmax(spec: str) -> dict[str, dict[str, str]]:
    return {g: {"a_observer": "minmax"} for g in ALL_GROUPS}


def _fc_input_range(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-channel min/max of the float model's block-1 c_fc input (the rule's expectation)."""
    seen = []
    fc = model.visual.transformer.resblocks[1].mlp.c_fc
    handle = fc.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    rows = seen[0].reshape(-1, seen[0].shape[-1])
    return rows.amin(dim=0), rows.amax(dim=0)


def test_float_weight_calibration_observes_the_float_model(tiny_images: torch.Tensor) -> None:
    model = build_tiny_clip()
    want_lo, want_hi = _fc_input_range(model, tiny_images)
    spec = get_spec("p4q-official", _minmax("p4q-official"))
    assert spec.float_weight_calibration
    student = quantize(model, spec)
    calibrate(student, images=[tiny_images], progress=False, texts=[torch.ones(1, 77).long()])
    q = student.visual.transformer.resblocks[1].mlp.c_fc.input_quantizer
    assert torch.allclose(q.range_min, want_lo, atol=1e-6)
    assert torch.allclose(q.range_max, want_hi, atol=1e-6)
    # the weights are quantized afterwards, on the official grid
    conv = student.visual.conv1
    assert bool(conv.weights_frozen) and conv.weight_quantizer.grid == "official"
    codes = torch.round(conv.weight / conv.weight_quantizer.scale.view(-1, 1, 1, 1))
    assert torch.allclose(codes * conv.weight_quantizer.scale.view(-1, 1, 1, 1), conv.weight)
    assert codes.min() >= -8 and codes.max() <= 7

    # observing behind quantized weights (the 4-bit patch embedding) sees other activations
    spec.float_weight_calibration = False
    other = quantize(model, spec)
    calibrate(other, images=[tiny_images], progress=False, texts=[torch.ones(1, 77).long()])
    q_other = other.visual.transformer.resblocks[1].mlp.c_fc.input_quantizer
    assert not torch.allclose(q_other.range_max, want_hi, atol=1e-4)


def test_float_weight_calibration_refuses_quantized_weights(tiny_images: torch.Tensor) -> None:
    student = quantize(build_tiny_clip(), get_spec("p4q-official", _minmax("p4q-official")))
    student.visual.conv1.freeze_weights()
    with pytest.raises(ValueError, match="already quantized"):
        calibrate(student, images=[tiny_images], progress=False)


# ------------------------------------------------------------------------------ the preset


def test_p4q_official_preset_sets_every_official_rule() -> None:
    spec = get_spec("p4q-official")
    assert spec.float_weight_calibration and spec.name == "p4q-official"
    bits = {g: (s.w_bits, s.a_bits) for g, s in spec.groups.items()}
    assert bits == {g: (s.w_bits, s.a_bits) for g, s in get_spec("p4q-448").groups.items()}
    for g in ("vision.patch_embed", "vision.mlp_fc", "text.attn_qkv", "adapter"):
        s = spec[g]
        assert (s.a_observer, s.a_per_channel, s.a_grid, s.a_score_on) == (
            "omse",
            True,
            "official",
            "last_batch",
        )
        assert s.w_grid == "official"
    assert get_spec(get_spec("p4q-official")).float_weight_calibration  # survives a round trip


def test_p4q_official_tiny_end_to_end(tiny_images: torch.Tensor, prompts: torch.Tensor) -> None:
    model = build_tiny_clip()
    student = quantize(model, "p4q-official")
    halves = list(tiny_images.chunk(2))
    stats = calibrate(student, images=halves, texts=[prompts[:2], prompts[2:]], progress=False)
    assert stats and all(0.0 <= s["clip_ratio"] <= 1.0 for s in stats.values())
    assert student.visual.conv1.input_quantizer.scale.shape == (3,)
    assert student.visual.transformer.resblocks[0].mlp.c_proj.input_quantizer.scale.shape == (256,)
    with torch.no_grad():
        for encode_s, encode_f, x in (
            (student.encode_image, model.encode_image, tiny_images),
            (student.encode_text, model.encode_text, prompts),
        ):
            ref, out = encode_f(x), encode_s(x)
            assert torch.isfinite(out).all()
            assert float((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.slow
def test_p4q_official_vitb32_random_weights_end_to_end() -> None:
    """ViT-B/32 with random weights, 8 random calibration images (9-30 s on 2 cores, by load): every
    quantizer calibrates, features stay finite and within 15 % of float (the official code
    is ~4 % from float with 128 calibration images, a smoke bound here)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    texts = [tokenizer([f"a photo of a {c}." for c in ("cat", "dog", "car", "tree")])]
    student = quantize(model, "p4q-official")
    calibrate(student, images=images, texts=texts, progress=False)
    probe = torch.randn(4, 3, 224, 224, generator=g)
    with torch.no_grad():
        for ref, out in (
            (model.encode_image(probe), student.encode_image(probe)),
            (model.encode_text(texts[0]), student.encode_text(texts[0])),
        ):
            assert torch.isfinite(out).all()
            assert float((out - ref).norm() / ref.norm()) < 0.15
    assert student.visual.conv1.input_quantizer.scale.shape == (3,)
    assert student.visual.transformer.resblocks[11].mlp.c_proj.input_quantizer.scale.shape == (
        3072,
    )


def test_last_batch_scoring_reaches_every_quantizer(
    tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    """w4a4 (q/k/v and probabilities quantized too) with every group scoring its last batch:
    calibration marks the last batch for every activation quantizer of both towers."""
    overrides = {g: {"a_score_on": "last_batch", "a_grid": "official"} for g in ALL_GROUPS}
    student = quantize(build_tiny_clip(), "w4a4", overrides=overrides)
    attn = student.visual.transformer.resblocks[0].attn
    assert attn.q_quantizer.score_on == "last_batch" and attn.q_quantizer.grid == "official"
    calibrate(student, images=list(tiny_images.chunk(2)), texts=[prompts], progress=False)
    with torch.no_grad():
        assert torch.isfinite(student.encode_image(tiny_images)).all()
