"""The int8 CPU path computes the fake-quant student's function with integer GEMMs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from export_helpers import CLASSNAMES

from p4q_lightning.export import (
    Int8Linear,
    Int8MultiheadAttention,
    convert_to_int8,
    export_lowbit,
    load_lowbit,
)
from p4q_lightning.quant import GroupSpec, QuantLinear

BACKENDS = ["fbgemm", "int_mm"]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (4, 4), (8, 4), (6, 5)])
def test_int8_linear_matches_fake_quant(backend: str, a_bits: int, w_bits: int) -> None:
    if backend == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm not built into this torch")
    layer = _layer(a_bits, w_bits)
    x = torch.randn(5, 7, 48) * 2  # some inputs fall outside the clip range
    with torch.no_grad():
        ref = layer(x)
        out = Int8Linear.from_quant_linear(layer, backend)(x)
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_float_or_per_channel_activations_stay_fake_quant() -> None:
    float_act = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=None), "test")
    per_channel = QuantLinear(8, 8, GroupSpec(w_bits=8, a_bits=8, a_per_channel=True), "test")
    model = torch.nn.Sequential(float_act, per_channel)
    convert_to_int8(model)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)


@pytest.mark.parametrize("preset", ["w8a8", "w4a4", "p4q-448"])
def test_converted_student_agrees_with_fake_quant(tiny_float, images, preset: str) -> None:
    from export_helpers import make_student

    student, text = make_student(tiny_float, preset)
    int8 = convert_to_int8(copy.deepcopy(student))
    assert any(isinstance(m, Int8MultiheadAttention) for m in int8.modules())
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
    path = export_lowbit(
        tmp_path / "m.safetensors",
        model,
        model_name=tiny_name,
        classnames=CLASSNAMES,
        text_features=text,
        logit_scale=100.0,
    ).path
    fq, i8 = load_lowbit(path), load_lowbit(path, int8=True)
    assert i8.int8 and not fq.int8
    assert (fq.predict(images) == i8.predict(images)).float().mean() >= 0.95
