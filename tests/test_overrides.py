"""Every argument that exists on both the model and the datamodule can be overridden from the
command line: Lightning used to fail merging the two sides' hyper-parameters when they differed
("Error while merging hparams: the keys ['templates'] are present in both ...")."""

from __future__ import annotations

import inspect

import pytest
import yaml

import tiny_world
from p4q_lightning import cli
from p4q_lightning.data import FewShotDataModule
from p4q_lightning.module import P4QModule

SHARED = sorted(
    set(inspect.signature(P4QModule).parameters)
    & set(inspect.signature(FewShotDataModule).parameters)
)
VALUES = {
    "templates": ["a blurry photo of a {}."],
    "classnames": [f"thing {i}" for i in range(len(tiny_world.CLASSES))],
}


def test_every_shared_argument_has_an_override_value():
    assert SHARED and set(SHARED) <= set(VALUES)


def _config(world, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "csv")},
            },
        },
        "model": {
            "model_name": tiny_world.MODEL_NAME,
            "pretrained": None,
            "model_config": str(world["config"]),
            "quant": "w8a8",
            "quant_overrides": tiny_world.MINMAX,
            "prompt": {"n_ctx": 2},
            "features": {"views": 1},
        },
        "data": {
            "class_path": "p4q_lightning.data.FewShotDataModule",
            "init_args": {
                "dataset": str(world["data"]),
                "shots": 2,
                "batch_size": 4,
                "image_size": 32,
                "num_workers": 0,
                "persistent_workers": False,
                "calib_images": 8,
                "split_dir": str(tmp_path / "splits"),
            },
        },
    }
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("side", ["model", "data.init_args"])
@pytest.mark.parametrize("name", SHARED)
def test_shared_argument_overrides_from_the_command_line(world, tmp_path, monkeypatch, name, side):
    monkeypatch.setenv("WANDB_MODE", "offline")
    value = VALUES[name]
    fit = cli.cli_main(
        ["fit", "--config", _config(world, tmp_path), f"--{side}.{name}", str(value)]
    )
    assert getattr(fit.model.classifier, name) == value  # the module ran with the overridden value
    assert fit.trainer.state.finished
