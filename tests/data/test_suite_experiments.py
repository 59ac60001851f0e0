"""The suite's YAMLs compose (method + backbone + protocol), take the dataset from the command
line and parse against the real classes (the tiny model swapped in, as for experiments/*.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from p4q_lightning import cli

SUITE = Path(__file__).resolve().parents[2] / "experiments" / "suite"
METHODS = ("p4q", "coop", "ptq", "zeroshot")


@pytest.mark.parametrize("path", sorted(SUITE.glob("*.yaml")), ids=lambda p: p.stem)
def test_header_says_what_it_reproduces_and_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("#") and "Reproduces:" in text and "lightning " in text


def test_backbones_are_openais_vit_b16_and_b32():
    for name, model in (("vitb16", "ViT-B-16-quickgelu"), ("vitb32", "ViT-B-32-quickgelu")):
        section = yaml.safe_load((SUITE / f"{name}.yaml").read_text())["model"]
        assert section == {"model_name": model, "pretrained": "openai"}


@pytest.mark.parametrize("method", METHODS)
def test_method_files_compose_with_a_backbone_and_a_protocol(method, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    protocol = "base_to_novel" if method in ("p4q", "coop") else "domain_generalisation"
    args = [
        "--config",
        str(SUITE / f"{method}.yaml"),
        "--config",
        str(SUITE / "vitb16.yaml"),
        "--config",
        str(SUITE / f"{protocol}.yaml"),
        "--model.model_name=p4q-tiny",
        "--model.pretrained=null",
        "--data.init_args.dataset=dtd",
        "--data.init_args.root=/data",
    ]
    run = cli.cli_main(args, run=False)
    assert run.model.method == method
    hp = run.datamodule.hparams
    assert (hp.dataset, hp.root, hp.shots) == ("dtd", "/data", 16)
    if protocol == "base_to_novel":
        assert hp.subsample_classes == "base"
    else:
        assert hp.test_datasets == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
        assert run.trainer.max_epochs in (50, None)
    if method in ("p4q", "ptq"):
        assert run.model.hparams.quant == "w4a4"


def test_a_suite_run_without_a_dataset_names_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(SUITE / "zeroshot.yaml"), "--model.model_name=p4q-tiny"]
    assert cli.main(["test", *args, "--model.pretrained=null"]) == 1
    assert "data.init_args.dataset is not set" in capsys.readouterr().err
    assert not list(tmp_path.rglob("config*.yaml"))  # nothing written


def test_a_base_to_novel_run_gets_its_own_run_directory():
    from p4q_lightning import rundir

    def identity(**data):
        init = {"dataset": "oxford_pets", "shots": 16, **data}
        return rundir.identity({"model": {"model_name": "ViT-B-16"}, "data": {"init_args": init}})

    assert identity().dataset == "oxford_pets"
    assert identity(subsample_classes="all").dataset == "oxford_pets"
    assert identity(subsample_classes="base").dataset == "oxford_pets-base"
