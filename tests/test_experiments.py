"""Every shipped experiment config parses against the real classes and instantiates with a tiny
model and data swapped in, so no YAML in experiments/ can rot."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import tiny_world
from p4q_lightning import cli
from p4q_lightning.args import GROUPS

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def _fewshot_available() -> bool:
    try:
        from p4q_lightning.data import FewShotDataModule  # noqa: F401
    except ImportError:
        return False
    return True


HAS_FEWSHOT = _fewshot_available()


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    for required in (
        "vitb32_8bit.yaml",
        "vitb32_4bit.yaml",
        "vitb32_p4q_official_cifar100.yaml",
        "vitb32_coop_fp.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_header_says_what_it_reproduces(path):
    text = path.read_text()
    assert text.startswith("#") and "Reproduces:" in text
    assert "lightning " in text  # how to run it


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_config_parses_and_instantiates_with_a_tiny_model(path, world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    original = yaml.safe_load(path.read_text())
    model_args = original["model"]
    if path.name.startswith("vitb32"):
        assert model_args["model_name"] == "ViT-B-32-quickgelu"
        assert model_args["pretrained"] == "openai"

    config = copy.deepcopy(original)
    config["model"].update(
        model_name=tiny_world.MODEL_NAME,
        pretrained=None,
        model_config=str(world["config"]),
    )
    config["model"].setdefault("prompt", {})["n_ctx"] = 4
    config["data"] = {
        "class_path": "tiny_world.TinyDataModule",
        "init_args": {"root": str(world["data"])},
    }
    trainer = config.setdefault("trainer", {})
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(tmp_path / "runs")
    for cb in trainer.get("callbacks") or []:
        if "dirpath" in cb.get("init_args", {}):
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    tiny = tmp_path / path.name
    tiny.write_text(yaml.safe_dump(config))

    run = cli.cli_main(["--config", str(tiny)], run=False)
    module = run.model
    assert module.method == model_args.get("method", "p4q")
    assert module.hparams.quant == model_args.get("quant", "w8a8")
    for key, value in model_args.items():
        if key in ("model_name", "pretrained"):
            continue
        if key in GROUPS:  # a nested group: each option given must arrive (n_ctx is the tiny's)
            for field, v in value.items():
                if (key, field) != ("prompt", "n_ctx"):
                    assert module.hparams[key][field] == v, f"{key}.{field}"
                    assert getattr(getattr(module, f"{key}_args"), field) == v
        else:
            assert module.hparams[key] == value, key
    assert (module.classifier.student is not module.classifier.teacher) == module.traits.quantized
    assert run.trainer.max_epochs == trainer.get("max_epochs", run.trainer.max_epochs)

    if HAS_FEWSHOT:  # the real data section must parse against FewShotDataModule's signature
        full = run.parser.parse_object({**original, "trainer": {**original.get("trainer", {})}})
        assert full.data.class_path.endswith("FewShotDataModule")
