"""Damaged caches and bad options: one ``error:`` line that names the file or option and the
fix (``P4Q_DEBUG=1`` for the traceback), not a library's bare message or 90 lines of usage."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import yaml

import tiny_world
from p4q_lightning import cli

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("P4Q_DEBUG", raising=False)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    logged = ("INFO ", "WARNING ", "Seed set", "GPU available", "TPU available", "💡")
    assert len([x for x in err.strip().splitlines() if not x.startswith(logged)]) == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert "P4Q_DEBUG=1" in err
    return lines[0]


def tiny_config(world, tmp: Path, **model) -> Path:
    model = {"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}, **model}
    return tiny_world.cli_config(world, tmp / "config.yaml", model=model)


def edit(path: Path, change) -> Path:
    body = yaml.safe_load(path.read_text())
    change(body)
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_truncated_teacher_cache_names_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    from p4q_lightning.demo import teacher

    monkeypatch.setenv("P4Q_CACHE_DIR", str(tmp_path / "cache"))
    config = teacher.PretrainConfig()
    stem = f"{teacher.MODEL_NAME}-world0-{teacher.recipe_fingerprint(0, config)}"
    cached = tmp_path / "cache" / f"{stem}.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32", ')
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "trainer": {"accelerator": "cpu", "logger": False},
                "model": {"model_name": "p4q-tiny", "pretrained": "synthetic:0", "method": "ptq"},
                "data": {
                    "class_path": "p4q_lightning.data.FewShotDataModule",
                    "init_args": {"dataset": "synthetic:0", "num_workers": 0},
                },
            }
        )
    )
    assert cli.main(["validate", "--config", str(cfg), "--run_dir", str(tmp_path / "r")]) == 1
    line = one_line_error(capsys)
    assert f"the cached demo teacher {cached} is damaged or truncated" in line
    assert "delete it" in line and "pretrained again" in line


def test_a_truncated_split_file_names_the_file_and_the_fix(world, tmp_path, capsys):
    from p4q_lightning.data import FewShotDataModule

    args = {"dataset": str(world["data"]), "shots": 2, "num_workers": 0, "image_size": 32}
    args["split_dir"] = str(tmp_path / "splits")
    dm = FewShotDataModule(**args)
    dm.prepare_data()
    split = dm.split_file
    split.write_text(split.read_text()[:40])  # cut short (a full disk, a killed copy)
    data = {"class_path": "p4q_lightning.data.FewShotDataModule", "init_args": args}
    cfg = tiny_world.cli_config(world, tmp_path / "c.yaml", model={"method": "ptq"}, data=data)
    assert cli.main(["validate", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert f"split file {split} is damaged" in line
    assert "delete it and the split is drawn again" in line


def test_an_unknown_yaml_key_is_one_line_naming_the_file(world, tmp_path, capsys, monkeypatch):
    cfg = edit(tiny_config(world, tmp_path), lambda c: c["model"]["prompt"].update(n_cxt=3))
    assert cli.main(["fit", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert f"unknown option model.prompt.n_cxt in {cfg}" in line
    assert "did you mean model.prompt.n_ctx?" in line and "p4q fit --help" in line
    monkeypatch.setenv("P4Q_DEBUG", "1")  # the rest: the traceback
    with pytest.raises(argparse.ArgumentError, match="n_cxt"):
        cli.main(["fit", "--config", str(cfg)])


def test_a_wrong_type_in_yaml_is_one_line(world, tmp_path, capsys):
    cfg = edit(tiny_config(world, tmp_path), lambda c: c["model"]["prompt"].update(n_ctx="four"))
    assert cli.main(["fit", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert f"option model.prompt.n_ctx must be int, got four in {cfg}" in line


def test_a_yaml_syntax_error_and_a_class_path_typo_are_one_line(world, tmp_path, capsys):
    cfg = tiny_config(world, tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(cfg.read_text().replace("max_epochs: 1", "max_epochs: [1"))
    assert cli.main(["fit", "--config", str(broken)]) == 1
    assert f"{broken} is not valid YAML (" in one_line_error(capsys)
    typo = edit(cfg, lambda c: c["data"].update(class_path="tiny_world.TinyDataModul"))
    assert cli.main(["fit", "--config", str(typo)]) == 1
    line = one_line_error(capsys)
    assert "data.class_path 'tiny_world.TinyDataModul' cannot be used (module 'tiny_world' " in (
        line
    )
    assert f"in {typo}; check the module and class name" in line


def test_bad_command_line_options_are_one_line(world, tmp_path, capsys):
    cfg = str(tiny_config(world, tmp_path))
    assert cli.main(["fit", "--config", cfg, "--trainer.max_epochs", "x"]) == 1
    line = one_line_error(capsys)
    assert "option trainer.max_epochs must be int, got x;" in line  # no file: it was a flag
    assert cli.main(["fit", "--config", cfg, "--data.init_args.batch_size", "abc"]) == 1
    assert "option data.init_args.batch_size must be int, got abc;" in one_line_error(capsys)
    assert cli.main(["test", "--config", cfg, "--model.adaptr.ratio", "0.5"]) == 1
    line = one_line_error(capsys)
    assert "unknown option model.adaptr.ratio (did you mean model.adapter.ratio?)" in line
    assert "p4q test --help" in line


def test_the_hub_error_names_the_current_login_command(monkeypatch):
    import datasets

    from p4q_lightning.data.hub import HubSource

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as info:
        HubSource._open("ILSVRC/imagenet-1k", None, None, None)
    assert "`hf auth login`" in str(info.value)
    assert "huggingface-cli" not in str(info.value)
