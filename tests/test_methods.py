"""The method table: every method's traits are what P4QModule, run names and export do."""

from __future__ import annotations

from typing import get_args

import pytest

import tiny_world
from p4q_lightning.export.format import ExportMismatchError
from p4q_lightning.export.from_module import export_module
from p4q_lightning.methods import METHODS, Method, quantized_methods, traits
from p4q_lightning.module import P4QModule
from p4q_lightning.rundir import _bits


def test_the_literal_and_the_table_name_the_same_methods():
    assert tuple(METHODS) == get_args(Method)
    assert quantized_methods() == tuple(m for m in METHODS if METHODS[m].quantized)


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'qat': use one of p4q, coop, ptq"):
        traits("qat")


@pytest.mark.parametrize("name", list(METHODS))
def test_module_follows_the_traits(world, name, tmp_path):
    t = METHODS[name]
    module = P4QModule(
        model_name=tiny_world.MODEL_NAME,
        pretrained=None,
        model_config=str(world["config"]),
        method=name,
        quant="w4a4",
        prompt={"n_ctx": 2},
        classnames=["red circle", "blue square"],
    )
    assert (module.classifier.student is not module.classifier.teacher) == t.quantized
    assert (module.classifier.adapter is not None) == t.uses_adapter
    assert (module.classifier.prompt_learner is not None) == t.trains_prompts
    assert module.distills == t.distils
    assert module.traits is t
    assert (_bits({"method": name, "quant": "w4a4"}) == "fp32") == (not t.quantized)
    if not t.quantized:
        with pytest.raises(ExportMismatchError, match="no quantized student"):
            export_module(module.classifier, tmp_path / "x.safetensors")
