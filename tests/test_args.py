"""P4QModule's option groups: made from dicts or instances, checked when made, and earlier flat
hyperparameters put into their groups."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

import tiny_world
from p4q_lightning.args import (
    GROUPS,
    AdapterArgs,
    FeatureArgs,
    LossArgs,
    OptimArgs,
    PromptArgs,
    as_group,
)
from p4q_lightning.legacy import FLAT_NAMES, group_flat_hparams
from p4q_lightning.module import P4QModule


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_group_comes_from_none_a_dict_or_an_instance(name):
    cls = GROUPS[name]
    default = cls()
    assert as_group(cls, None, f"model.{name}") == default
    assert as_group(cls, default, f"model.{name}") is default
    first = dataclasses.fields(cls)[0]
    assert as_group(cls, {first.name: first.default}, f"model.{name}") == default


@pytest.mark.parametrize("name", list(GROUPS))
def test_an_unknown_option_names_the_group_and_its_options(name):
    cls = GROUPS[name]
    with pytest.raises(ValueError, match=rf"model\.{name} has no option 'nope'; its options are"):
        as_group(cls, {"nope": 1}, f"model.{name}")
    with pytest.raises(TypeError, match=rf"model\.{name} must be a mapping"):
        as_group(cls, 3, f"model.{name}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PromptArgs(class_token_position="left"), "prompt.class_token_position='left'"),
        (lambda: PromptArgs(chunk_size=0), "prompt.chunk_size=0"),
        (lambda: AdapterArgs(reduction=0), "adapter.reduction=0"),
        (lambda: AdapterArgs(ratio=1.5), "adapter.ratio=1.5"),
        (lambda: LossArgs(distill_kind="mse"), "loss.distill_kind='mse'"),
        (lambda: LossArgs(teacher_text="labels"), "loss.teacher_text='labels'"),
        (lambda: LossArgs(temperature=0.0), "loss.temperature=0.0"),
        (lambda: OptimArgs(warmup_epochs=-1), "optim.warmup_epochs=-1"),
        (lambda: FeatureArgs(views=-1), "features.views=-1"),
    ],
)
def test_bad_values_fail_when_the_group_is_made(make, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("old", list(FLAT_NAMES))
def test_every_earlier_flat_name_lands_in_its_group(old):
    group, field = FLAT_NAMES[old]
    value = getattr(GROUPS[group](), field)
    grouped = group_flat_hparams({"method": "p4q", old: value})
    assert grouped == {"method": "p4q", group: {field: value}}
    assert field in {f.name for f in dataclasses.fields(GROUPS[group])}


def test_flat_names_override_a_given_group_and_adapter_flag_becomes_enabled():
    grouped = group_flat_hparams(
        {"prompt": {"n_ctx": 8, "init_std": 0.1}, "n_ctx": 2, "adapter": False}
    )
    assert grouped == {"prompt": {"n_ctx": 2, "init_std": 0.1}, "adapter": {"enabled": False}}
    already = {"prompt": {"n_ctx": 2}, "adapter": {"enabled": True}}
    assert group_flat_hparams(already) == already


def test_module_hyperparameters_are_plain_data(world):
    """A checkpoint's hyperparameters must load with ``weights_only=True`` and rebuild the same
    module options."""
    module = P4QModule(
        **tiny_world.module_args(world, prompt=PromptArgs(n_ctx=3), optim={"prompt_lr": 0.1})
    )
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["prompt"]["n_ctx"] == 3 and loaded["optim"]["prompt_lr"] == 0.1
    rebuilt = P4QModule(**loaded)
    for group in GROUPS:
        assert getattr(rebuilt, f"{group}_args") == getattr(module, f"{group}_args")
