"""A low-bit file is data: crafted metadata with a recomputed checksum never runs code and never
loads silently; every field is validated before anything is built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p4q_lightning.export import (
    ExportMismatchError,
    LowBitFormatError,
    export_lowbit,
    load_lowbit,
    read_container,
    write_container,
)
from p4q_lightning.export.writer import HEAD
from p4q_lightning.model.adapter import LowBitAdapter
from p4q_lightning.quant import quant_spec_of


@pytest.fixture(scope="module")
def classifier(tiny_float):
    from export_helpers import CLASSNAMES, make_student

    student, text = make_student(tiny_float, "w8a8")
    torch.manual_seed(3)
    adapter = LowBitAdapter(32, 4, 0.5, True, quant_spec_of(student)["adapter"])
    adapter.calibrate([torch.randn(16, 32)])
    return student, text, adapter, CLASSNAMES


@pytest.fixture()
def exported(classifier, tmp_path, tiny_name) -> Path:
    student, text, adapter, names = classifier
    return export_lowbit(
        tmp_path / "m.safetensors",
        student,
        model_name=tiny_name,
        classnames=names,
        text_features=text,
        logit_scale=100.0,
        adapter=adapter,
    ).path


def rewrite(path: Path, edit) -> None:
    """What an attacker does: edit the metadata/tensors and recompute the checksum."""
    tensors, info = read_container(path)
    edit(tensors, info)
    write_container(path, tensors, {k: v for k, v in info.items() if k != "format"})


def test_adapter_is_a_registered_kind_and_round_trips(classifier, exported, images) -> None:
    _, info = read_container(exported)
    assert info["adapter"]["kind"] == "low_bit_adapter" and "target" not in info["adapter"]
    loaded = load_lowbit(exported)
    _, _, adapter, _ = classifier
    z = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.adapter(z), adapter.eval()(z), atol=1e-6)


@pytest.mark.parametrize(
    "target", ["p4q_lightning.export.format:write_container", "p4q_lightning.cli:main", "os:system"]
)
def test_crafted_import_target_is_refused_and_never_called(exported, tmp_path, target) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def craft(tensors, info):
        info["adapter"] = {
            "target": target,
            "init": {"path": str(victim), "tensors": {}, "info": {}, "args": ["--help"]},
        }

    rewrite(exported, craft)
    with pytest.raises(LowBitFormatError, match="target.*refused|no code"):
        load_lowbit(exported)
    assert victim.read_text() == "precious"


def test_legacy_target_of_the_adapter_class_is_read_as_data(exported) -> None:
    def legacy(tensors, info):
        init = dict(info["adapter"]["init"])
        init["spec"] = {"__type__": "GroupSpec", **init["spec"]}
        info["adapter"] = {"target": "p4q_lightning.model.adapter:LowBitAdapter", "init": init}

    rewrite(exported, legacy)
    assert isinstance(load_lowbit(exported).adapter, LowBitAdapter)


def _set(path: tuple, value):
    def edit(tensors, info):
        node = info
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _first_quantized(tensors, info):
    return next(iter(info["quantized"]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(("adapter", "kind"), "evil_kind"), "not registered"),
        (_set(("adapter", "init", "act_layer"), "os.system"), "exactly the arguments"),
        (_set(("adapter", "init", "ratio"), 7.0), "ratio"),
        (_set(("adapter", "init", "spec", "w_bits"), 4), "adapter bits"),
        (lambda t, i: i["classnames"].pop(), "class names for 10 text-feature rows"),
        (lambda t, i: t[HEAD + "text_features"].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda t, i: t[HEAD + "logit_scale"].fill_(float("inf")), "NaN or infinite"),
        (
            lambda t, i: i["quantized"][_first_quantized(t, i)].__setitem__("bits", 12),
            "claims 12 bits",
        ),
        (
            lambda t, i: i["quantized"][_first_quantized(t, i)].__setitem__("shape", [1000, 1000]),
            "bytes, not 8-bit codes",
        ),
        (
            lambda t, i: next(iter(i["zeros"].values())).__setitem__("dtype", "save"),
            "dtype 'save'",
        ),
        (_set(("model", "name"), "hf-hub:someone/model"), "not a plain open_clip model name"),
        (_set(("model", "config", "text_cfg", "hf_model_name"), "bert"), "hf_model_name"),
        (_set(("spec", "groups", "adapter", "w_bits"), 99), "quantization spec is invalid"),
    ],
    ids=[
        "unknown-kind",
        "extra-init-arg",
        "ratio",
        "adapter-bits",
        "classnames",
        "nan",
        "inf",
        "bits",
        "code-shape",
        "zeros-dtype",
        "hub-name",
        "hf-config",
        "spec",
    ],
)
def test_edited_file_with_recomputed_checksum_is_refused(exported, edit, message) -> None:
    rewrite(exported, edit)
    with pytest.raises(LowBitFormatError, match=message):
        load_lowbit(exported)


def test_text_feature_width_must_fit_the_model(exported) -> None:
    def widen(tensors, info):
        tensors[HEAD + "text_features"] = torch.zeros(10, 7)

    rewrite(exported, widen)
    with pytest.raises(ExportMismatchError, match="7 wide"):
        load_lowbit(exported)


def test_writer_refuses_import_targets_and_nan_without_writing(classifier, tmp_path, tiny_name):
    student, text, adapter, names = classifier
    out = tmp_path / "m.safetensors"
    with pytest.raises(ExportMismatchError, match="registered adapter kind"):
        export_lowbit(
            out,
            student,
            model_name=tiny_name,
            adapter=adapter,
            adapter_config={"target": "p4q_lightning.model.adapter:LowBitAdapter", "init": {}},
        )
    bad = text.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ExportMismatchError, match="NaN"):
        export_lowbit(out, student, model_name=tiny_name, classnames=names, text_features=bad)
    assert list(tmp_path.iterdir()) == []
