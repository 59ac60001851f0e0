"""quantize / calibrate on a tiny open_clip CLIP: structure, frozen weights, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from quant_helpers import build_tiny_clip, calibrated
from torch import nn

from p4q_lightning import calibrate, quantize
from p4q_lightning.quant import (
    ActivationQuantizer,
    Log2Quantizer,
    NotCalibratedError,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
    WeightQuantizer,
    group_statistics,
    is_calibrated,
    quant_modules,
    quant_spec_of,
    quantizers,
)


def test_w4a4_quantizes_every_layer_at_4_bits(tiny_clip: nn.Module) -> None:
    student = quantize(tiny_clip, "w4a4")
    float_layers = [
        n
        for n, m in student.named_modules()
        if type(m) in (nn.Linear, nn.Conv2d, nn.MultiheadAttention, nn.Embedding)
    ]
    assert float_layers == [], f"left in float: {float_layers}"
    kinds = {type(m) for _, m in quant_modules(student)}
    assert kinds == {QuantLinear, QuantConv2d, QuantEmbedding}
    n_blocks = len(student.visual.transformer.resblocks) + len(student.transformer.resblocks)
    # every quantized weight is found once: 4 linears per block, the patch conv, the token table
    weights = [id(m.weight) for _, m in quant_modules(student)]
    assert len(weights) == len(set(weights)) == 4 * n_blocks + 2
    for name, m in quant_modules(student):
        assert m.weight_quantizer.bits == 4, name
        if isinstance(m, QuantEmbedding):
            assert m.weight_quantizer.scale.numel() == m.num_embeddings, "token table: per row"
        else:
            assert m.input_quantizer.bits == 4, name
    attentions = [m for m in student.modules() if isinstance(m, QuantMultiheadAttention)]
    assert len(attentions) == n_blocks
    for m in attentions:
        assert m.internals_quantized
        for q in (m.q_quantizer, m.k_quantizer, m.v_quantizer, m.probs_quantizer):
            assert q.bits == 4
        # the projections are the leaves that hold the weights; the attention holds none
        assert isinstance(m.in_proj, QuantLinear) and m.in_proj.group.endswith(".attn_qkv")
        assert isinstance(m.out_proj, QuantLinear) and m.out_proj.group.endswith(".attn_out")
        assert (m.in_proj.in_features, m.in_proj.out_features) == (m.embed_dim, 3 * m.embed_dim)
        assert m.out_proj.weight_quantizer.bits == 4
        assert not hasattr(m, "weight") and not hasattr(m, "input_quantizer")
    assert quant_spec_of(student).name == "w4a4"


def test_p4q_448_student_quantizes_only_the_official_tensors(tiny_clip: nn.Module) -> None:
    student = quantize(tiny_clip, "p4q-448")
    conv = student.visual.conv1
    assert (conv.weight_quantizer.bits, conv.input_quantizer.bits) == (4, 4)
    assert not student.token_embedding.weight_quantizer.enabled
    for block in [*student.visual.transformer.resblocks, *student.transformer.resblocks]:
        attn = block.attn
        assert (attn.in_proj.weight_quantizer.bits, attn.in_proj.input_quantizer.bits) == (8, 8)
        assert (attn.out_proj.weight_quantizer.bits, attn.out_proj.input_quantizer.bits) == (
            8,
            None,
        )
        assert not attn.internals_quantized
        for fc in (block.mlp.c_fc, block.mlp.c_proj):
            assert (fc.weight_quantizer.bits, fc.input_quantizer.bits) == (8, 8)


def test_token_embedding_rows_sit_on_their_own_4_bit_grid(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = calibrated(tiny_clip, "w4a4", tiny_images, prompts)
    emb = student.token_embedding
    codes = emb.weight / emb.weight_quantizer.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().abs().amax(dim=1).eq(7).all(), "each row uses its full [-7, 7] range"


def test_weights_are_quantized_once_and_never_again(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = calibrated(tiny_clip, "w4a4", tiny_images, prompts)
    layers = list(quant_modules(student))
    before = {n: (m.weight, m.weight.data_ptr(), m.weight.detach().clone()) for n, m in layers}
    for n, m in layers:
        assert bool(m.weights_frozen), n
        bshape = (-1,) + (1,) * (m.weight.dim() - 1)
        codes = m.weight / m.weight_quantizer.scale.view(bshape)
        assert torch.allclose(codes, codes.round(), atol=1e-4), f"{n} weight is not on its grid"
    calls = []
    hooks = [
        q.register_forward_hook(lambda mod, inp, out: calls.append(mod))
        for _, q in quantizers(student)
        if isinstance(q, WeightQuantizer)
    ]
    try:
        for mode in (False, True):
            student.train(mode)
            with torch.no_grad():
                student.encode_image(tiny_images)
                student.encode_text(prompts)
            x = (student.token_embedding(prompts) + student.positional_embedding).requires_grad_(
                True
            )
            student.transformer(x, attn_mask=student.attn_mask).sum().backward()
        calibrate(student, images=[tiny_images], texts=[prompts], progress=False)  # again
    finally:
        for h in hooks:
            h.remove()
    assert calls == [], "a WeightQuantizer ran after calibration"
    for n, m in layers:
        param, ptr, values = before[n]
        assert m.weight is param and m.weight.data_ptr() == ptr, n
        assert torch.equal(m.weight, values), f"{n} weight changed"


def test_encoding_before_calibration_raises(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = quantize(tiny_clip, "w4a4")
    assert not is_calibrated(student)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        student.encode_image(tiny_images)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        student.encode_text(prompts)
    weights_only = quantize(
        tiny_clip,
        "w4a4",
        overrides={
            k: {"a_bits": None}
            for k in ("patch_embed", "attn_qkv", "attn_out", "attn_internals", "mlp_fc", "mlp_proj")
        },
    )
    with pytest.raises(NotCalibratedError):
        weights_only.encode_image(tiny_images)
    calibrate(weights_only, progress=False)  # nothing to observe: weights only
    assert is_calibrated(weights_only)
    weights_only.encode_image(tiny_images)


def test_fp_student_needs_no_calibration(tiny_clip: nn.Module, tiny_images: torch.Tensor) -> None:
    student = quantize(tiny_clip, "fp")
    assert is_calibrated(student) and list(quantizers(student)) == []
    torch.testing.assert_close(
        student.encode_image(tiny_images), tiny_clip.encode_image(tiny_images), rtol=1e-5, atol=0
    )


def test_calibrating_with_no_data_is_a_clear_error(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = quantize(tiny_clip, "w8a8")
    with pytest.raises(
        ValueError,
        match=r"no data: the vision tower .* `images=` is empty and the text tower .* `texts=`",
    ):
        calibrate(student, progress=False)
    with pytest.raises(
        ValueError, match=r"text tower has quantized activations but `texts=` is empty"
    ):
        calibrate(student, images=[tiny_images], progress=False)
    with pytest.raises(ValueError, match=r"vision tower .* `images=` is empty"):
        calibrate(student, images=[], texts=[prompts], progress=False)
    assert not is_calibrated(student)
    # a failed calibration leaves no quantizer stuck observing
    assert all(
        q.mode == "quant" for _, q in quantizers(student) if isinstance(q, ActivationQuantizer)
    )
    vision_only = quantize(
        tiny_clip,
        "w8a8",
        overrides={
            k: {"w_bits": None, "a_bits": None}
            for k in (
                "text.attn_qkv",
                "text.attn_out",
                "text.attn_internals",
                "text.mlp_fc",
                "text.mlp_proj",
            )
        },
    )
    calibrate(vision_only, images=[tiny_images], progress=False)
    assert is_calibrated(vision_only)


def test_calibrate_accepts_tensors_iterables_and_labelled_pairs(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    a = quantize(tiny_clip, "w8a8")
    stats = calibrate(a, images=tiny_images, texts=prompts, progress=False)
    b = quantize(tiny_clip, "w8a8")
    calibrate(b, images=[(tiny_images, torch.zeros(4))], texts=iter([prompts]), progress=False)
    assert is_calibrated(a) and is_calibrated(b)
    for (na, qa), (nb, qb) in zip(quantizers(a), quantizers(b), strict=True):
        assert na == nb and torch.equal(qa.scale, qb.scale), na
    act_names = {n for n, q in quantizers(a) if isinstance(q, ActivationQuantizer)}
    assert set(stats) == act_names
    groups = group_statistics(stats, a)
    # exactly the groups with activation quantizers (no module name left as a group)
    layer_groups = ("attn_qkv", "attn_out", "attn_internals", "mlp_fc", "mlp_proj")
    assert set(groups) == {"vision.patch_embed"} | {
        f"{tower}.{g}" for tower in ("vision", "text") for g in layer_groups
    }
    assert all(0.0 <= g["clip_ratio"] <= 1.0 for g in groups.values())


def test_state_dict_round_trip_and_cached_flags(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = calibrated(tiny_clip, "w4a4", tiny_images, prompts)
    with torch.no_grad():
        expected = student.encode_image(tiny_images)
    fresh = quantize(build_tiny_clip(seed=5), "w4a4")  # other float weights, uncalibrated
    fresh.load_state_dict(student.state_dict())
    assert is_calibrated(fresh)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(tiny_images), expected)
    # the calibrated flag is cached for speed; loading an uncalibrated state must undo it
    student.load_state_dict(quantize(tiny_clip, "w4a4").state_dict())
    with pytest.raises(NotCalibratedError):
        student.encode_image(tiny_images)


def test_quantizing_a_student_again_is_refused(tiny_clip: nn.Module) -> None:
    student = quantize(tiny_clip, "w8a8")
    with pytest.raises(ValueError, match="already a quantized student"):
        quantize(student, "w4a4")


def test_log2_softmax_option(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    student = quantize(
        tiny_clip, "w8a8", overrides={"attn_internals": {"softmax_quantizer": "log2"}}
    )
    attn = student.transformer.resblocks[0].attn
    assert isinstance(attn.probs_quantizer, Log2Quantizer) and attn.probs_quantizer.bits == 8
    seen = []
    attn.probs_quantizer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    calibrate(student, images=[tiny_images], texts=[prompts], progress=False)
    seen.clear()
    with torch.no_grad():
        student.encode_text(prompts)
    probs = seen[0]
    nonzero = probs[probs > 0]
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round()), "not on log2 levels"
    causal = torch.ones(probs.shape[-2:], dtype=torch.bool).triu(1)
    assert probs[..., causal].abs().max() == 0, "masked positions must stay exactly 0"


def test_unobserved_quantizers_are_reported(
    tiny_clip: nn.Module,
    tiny_images: torch.Tensor,
    prompts: torch.Tensor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    student = quantize(tiny_clip, "w8a8")
    student.visual.transformer.resblocks = student.visual.transformer.resblocks[:1]
    orphan = quantize(tiny_clip, "w8a8").visual.transformer.resblocks[1]
    student.add_module("unused_block", orphan)  # its quantizers never see data
    with caplog.at_level(logging.WARNING, logger="p4q_lightning.quant.calibrate"):
        calibrate(student, images=[tiny_images], texts=[prompts], progress=False)
    assert "saw no data" in caplog.text and "unused_block" in caplog.text
    assert not is_calibrated(student)


def test_quantizer_buffers_follow_the_model_device() -> None:
    """A model already on an accelerator gets its scales there too (checked with 'meta')."""
    with torch.device("meta"):
        model = build_tiny_clip()
    student = quantize(model, "w4a4")
    wrong = [n for n, b in student.named_buffers() if b.device.type != "meta"]
    assert wrong == []


def test_parameters_cached_in_inference_mode_serve_a_later_backward(
    tiny_clip: nn.Module, tiny_images: torch.Tensor, prompts: torch.Tensor
) -> None:
    """Evaluation (inference_mode) first, prompt training (autograd) after, on one student."""
    student = quantize(tiny_clip, "w4a4", overrides={"mlp_fc": {"a_per_channel": True}})
    calibrate(student, images=[tiny_images], texts=[prompts], progress=False)
    with torch.inference_mode():
        expected = student.encode_text(prompts)
    x = (student.token_embedding(prompts) + student.positional_embedding).requires_grad_(True)
    h = student.ln_final(student.transformer(x, attn_mask=student.attn_mask))
    features = h[torch.arange(h.shape[0]), prompts.argmax(dim=-1)] @ student.text_projection
    features.sum().backward()
    assert torch.equal(features.detach(), expected)
    assert x.grad is not None and x.grad.abs().sum() > 0
