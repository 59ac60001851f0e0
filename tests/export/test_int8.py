"""The int8 CPU path computes the fake-quant student's function with integer GEMMs."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from export_helpers import CLASSNAMES, export_head

from p4q_lightning.export import (
    Int8Linear,
    convert_to_int8,
    fbgemm_exact,
    int8_backend,
    int8_convertible,
    load_lowbit,
)
from p4q_lightning.export import int8 as int8_module
from p4q_lightning.quant import PRESETS, GroupSpec, QuantLinear, QuantMultiheadAttention, get_spec

# None = the kernel the library selects on this CPU; it is tested everywhere, never skipped.
BACKENDS = [None, "fbgemm", "int_mm"]
SHAPES = [(8, 8), (4, 4), (8, 4), (6, 5)]


def _layer(a_bits: int, w_bits: int) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(
        48, 40, GroupSpec(w_bits=w_bits, a_bits=a_bits, a_observer="minmax"), "test"
    )
    torch.nn.init.normal_(layer.weight, std=0.2)
    torch.nn.init.normal_(layer.bias)
    layer.input_quantizer.set_range(torch.tensor([-1.5]), torch.tensor([2.5]))
    layer.freeze_weights()
    return layer


def _relative_error(layer: QuantLinear, backend: str | None) -> float:
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(1)) * 2  # some clip
    with torch.no_grad():
        ref = layer(x)
        out = Int8Linear.from_quant_linear(layer, backend)(x)
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_bits,w_bits", SHAPES)
def test_int8_linear_matches_fake_quant(backend: str | None, a_bits: int, w_bits: int) -> None:
    layer = _layer(a_bits, w_bits)
    if backend == "fbgemm" and not fbgemm_exact():
        # where fbgemm would be wrong the library neither selects it nor lets it be forced
        assert int8_backend() == "int_mm"
        with pytest.raises(ValueError, match="saturates"):
            Int8Linear.from_quant_linear(layer, backend)
        return
    assert _relative_error(layer, backend) < 1e-5


def test_forced_fbgemm_is_refused_where_it_saturates(monkeypatch) -> None:
    """A CPU without VNNI is simulated by the probe's answer: forcing fbgemm then fails loudly."""
    monkeypatch.setattr(int8_module, "fbgemm_exact", lambda: False)
    with pytest.raises(ValueError, match="backend='int_mm'"):
        Int8Linear.from_quant_linear(_layer(8, 8), "fbgemm")
    with pytest.raises(ValueError, match="saturates"):
        convert_to_int8(torch.nn.Sequential(_layer(8, 8)), backend="fbgemm")


PROBE_VS_REALITY = """
import json, torch, sys
sys.path.insert(0, {tests!r})
from test_int8 import _forced_fbgemm_error, _layer, _relative_error
from p4q_lightning.export import cpu_int8_report
report = cpu_int8_report()
report["selected_error"] = _relative_error(_layer(8, 8), None)
report["fbgemm_error"] = _forced_fbgemm_error()
print(json.dumps(report))
"""


def _forced_fbgemm_error() -> float | None:
    """fbgemm's real 8-bit error here, bypassing the library's probe (None: not built in)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    from unittest import mock

    with mock.patch.object(int8_module, "fbgemm_exact", lambda: True):
        return _relative_error(_layer(8, 8), "fbgemm")


def test_probe_agrees_with_a_real_8bit_layer() -> None:
    """The probe says fbgemm is exact exactly when a realistic 8-bit layer computes exactly."""
    err = _forced_fbgemm_error()
    if err is None:
        assert not fbgemm_exact() and int8_backend() == "int_mm"
        return
    assert fbgemm_exact() == (err < 1e-5), f"probe {fbgemm_exact()} but real error {err:.3g}"


@pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="needs an x86 CPU with fbgemm built into torch",
)
def test_avx2_only_cpu_selects_an_exact_kernel() -> None:
    """fbgemm limited to AVX2 (as on a CPU without VNNI): the library picks ``int_mm`` and the
    8-bit layer is exact. FBGEMM_ENABLE_INSTRUCTIONS makes any x86 CPU behave that way."""
    code = PROBE_VS_REALITY.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["fbgemm_instructions_env"] == "AVX2"
    assert report["selected_error"] < 1e-5
    assert report["int8_backend"] == ("fbgemm" if report["fbgemm_exact"] else "int_mm")
    # the probe is right about the real layer (an fbgemm that ignores the variable is exact)
    assert report["fbgemm_exact"] == (report["fbgemm_error"] < 1e-5), report


def test_float_or_per_channel_activations_stay_fake_quant() -> None:
    float_act = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=None), "test")
    per_channel = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=8, a_per_channel=True), "test")
    model = torch.nn.Sequential(float_act, per_channel)
    convert_to_int8(model)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)


def _int8_attention(name: str) -> bool:
    """Presets whose attention q/k/v projection can run as an int8 GEMM (weights and a
    per-tensor input of at most 8 bits)."""
    g = get_spec(name)["vision.attn_qkv"]
    return bool(g.w_bits and g.a_bits and g.a_bits <= 8 and not g.a_per_channel)


INT8_PRESETS = [name for name in PRESETS if _int8_attention(name)]


def test_the_int8_presets_include_the_main_ones() -> None:
    assert {"w8a8", "w4a4", "p4q-448"} <= set(INT8_PRESETS)
    assert "fp" not in INT8_PRESETS and "p4q-official" not in INT8_PRESETS


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_converted_student_agrees_with_fake_quant(tiny_float, images, preset: str) -> None:
    from export_helpers import make_student

    student, text = make_student(tiny_float, preset)
    int8 = convert_to_int8(copy.deepcopy(student))
    # the same attention class, now with an int8 q/k/v projection leaf
    attentions = [m for m in int8.modules() if isinstance(m, QuantMultiheadAttention)]
    assert attentions and all(isinstance(m.in_proj, Int8Linear) for m in attentions)
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    with torch.no_grad():
        ref, out = student.encode_image(images), int8.encode_image(images)
        tref, tout = (
            student.encode_text(tiny_float[1](CLASSNAMES)),
            int8.encode_text(tiny_float[1](CLASSNAMES)),
        )
    # equal up to rare one-step rounding flips that later quantizers propagate
    assert F.cosine_similarity(ref, out).min() > 0.995
    assert F.cosine_similarity(tref, tout).min() > 0.995
    agree = (F.normalize(ref, dim=-1) @ text.t()).argmax(1) == (
        F.normalize(out, dim=-1) @ text.t()
    ).argmax(1)
    assert agree.float().mean() >= 0.95


def test_load_lowbit_int8(student, images, tmp_path, tiny_name) -> None:
    preset, model, text = student
    path = export_head(tmp_path / "m.safetensors", model, tiny_name, text)
    fq, i8 = load_lowbit(path), load_lowbit(path, int8=True)
    assert i8.int8 and not fq.int8
    assert (fq.predict(images) == i8.predict(images)).float().mean() >= 0.95


def test_per_channel_student_says_int8_cannot_take_it(tiny_float, images, caplog) -> None:
    """``p4q-official`` has per-channel input ranges everywhere: int8 conversion converts none
    of its layers, says why in one warning, and leaves the fake-quant result unchanged."""
    from export_helpers import make_student

    student, _ = make_student(tiny_float, "p4q-official")
    with caplog.at_level("WARNING", logger="p4q_lightning.export.int8"):
        int8 = convert_to_int8(copy.deepcopy(student))
    assert not any(isinstance(m, Int8Linear) for m in int8.modules())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "per-channel input ranges" in warnings[0]
    with torch.no_grad():
        assert torch.equal(int8.encode_image(images), student.encode_image(images))


def test_official_grid_codes_reach_int8() -> None:
    """Official 8-bit grid: the code -128 survives the int8 weight (the restricted grid's
    clamp to -127 would move it by one step)."""
    layer = QuantLinear(
        4, 2, GroupSpec(w_bits=8, a_bits=8, a_observer="minmax", w_grid="official"), "test"
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.55, -2.55, 1.0, 0.0], [-1.0, 0.5, 0.25, 0.1]]))
    layer.input_quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    layer.freeze_weights()
    assert layer.weight_quantizer.codes(layer.weight)[0].tolist() == [127, -128, 50, 0]
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = layer(x)
        out = Int8Linear.from_quant_linear(layer, "int_mm")(x)
    assert torch.allclose(out, ref, atol=1e-5)


def _attention(internals_bits: int | None) -> QuantMultiheadAttention:
    """A calibrated w8a8 attention (q/k/v and probabilities quantized unless bits is None)."""
    torch.manual_seed(0)
    spec = GroupSpec(w_bits=8, a_bits=8, a_observer="minmax")
    attn = QuantMultiheadAttention(
        torch.nn.MultiheadAttention(48, 4),
        spec,
        GroupSpec(a_bits=internals_bits, a_observer="minmax"),
        spec,
        "vision",
    )
    attn.in_proj.freeze_weights()
    attn.out_proj.freeze_weights()
    attn.in_proj.input_quantizer.set_range(torch.tensor([-3.0]), torch.tensor([3.0]))
    attn.out_proj.input_quantizer.set_range(torch.tensor([-1.5]), torch.tensor([1.5]))
    if internals_bits is not None:
        for q in (attn.q_quantizer, attn.k_quantizer, attn.v_quantizer):
            q.set_range(torch.tensor([-4.0]), torch.tensor([4.0]))
        attn.probs_quantizer.set_range(torch.tensor([0.0]), torch.tensor([1.0]))
    return attn.eval()


@pytest.mark.parametrize("backend", [None, "int_mm"])
@pytest.mark.parametrize("internals_bits", [8, None])
def test_int8_attention_is_the_same_class_with_int8_leaves(
    internals_bits: int | None, backend: str | None
) -> None:
    """``convert_to_int8`` swaps the attention's projection leaves, not the attention: its own
    forward (masks, q/k/v codes) runs around the integer GEMMs and agrees with fake-quant."""
    attn = _attention(internals_bits)
    model = torch.nn.Sequential(attn)
    fake = copy.deepcopy(model)
    convert_to_int8(model, backend)
    assert type(model[0]) is QuantMultiheadAttention
    assert isinstance(model[0].in_proj, Int8Linear) and isinstance(model[0].out_proj, Int8Linear)
    x = torch.randn(7, 3, 48, generator=torch.Generator().manual_seed(3))  # [L, B, E]
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    with torch.no_grad():
        ref, _ = fake[0](x, x, x, need_weights=False, attn_mask=mask)
        out, _ = model[0](x, x, x, need_weights=False, attn_mask=mask)
    assert out.shape == ref.shape
    # the integer GEMMs give the fake-quant values up to float rounding of the rescale; with
    # this seed no q/k/v or probability code sits on a rounding tie, so nothing flips
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_int8_filter_picks_only_per_tensor_quantized_linears() -> None:
    attn = _attention(8)
    assert int8_convertible(attn.in_proj, "attn.in_proj")
    assert int8_convertible(attn.out_proj, "attn.out_proj")
    assert not int8_convertible(attn, "attn")
    per_channel = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=8, a_per_channel=True), "test")
    assert not int8_convertible(per_channel)
    uncalibrated = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=8), "test")
    assert not int8_convertible(uncalibrated)
