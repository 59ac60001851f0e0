"""Checkpoints that must not be used as they are: NaN/inf tensors, model flags that contradict
the checkpoint, and a checkpoint write that fails half-way (a full disk). Each is one clear line
from every command that loads a checkpoint, and the previous ``last.ckpt`` survives."""

from __future__ import annotations

import builtins
import errno
import os
import warnings
from pathlib import Path

import pytest
import torch

import tiny_world
from p4q_lightning import cli

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("P4Q_DEBUG", raising=False)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert "P4Q_DEBUG=1" in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> dict:
    """One epoch of the tiny P4Q fit through the command line, with checkpointing."""
    tmp = tmp_path_factory.mktemp("trained")
    model = {"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}}
    cfg = tiny_world.cli_config(world, tmp / "config.yaml", model=model)
    run = tmp / "run"
    assert cli.main(["fit", "--config", str(cfg), "--run_dir", str(run)]) is None
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    return {"config": cfg, "run": run, "last": last}


PARTS = {
    "prompt": ("classifier.prompt_learner.ctx", "the prompt context"),
    "adapter": ("classifier.adapter.fc1.weight", "the adapter"),
    "range": (
        "classifier.student.visual.transformer.resblocks.0.mlp.c_fc.input_quantizer.range_max",
        "the student's quantizer parameters",
    ),
}


def spoiled(trained: dict, tmp_path: Path, part: str, value: float = float("nan")) -> Path:
    ckpt = torch.load(trained["last"], weights_only=True)
    key = PARTS[part][0]
    ckpt["state_dict"][key].view(-1)[0] = value
    path = tmp_path / f"{part}.ckpt"
    torch.save(ckpt, path)
    return path


def assert_names_the_tensor(line: str, path: Path, part: str) -> None:
    key, what = PARTS[part]
    assert f"checkpoint {path} holds NaN or inf" in line
    assert f"{key} ({what})" in line
    assert "use an earlier checkpoint" in line


@pytest.mark.parametrize("part", sorted(PARTS))
def test_non_finite_checkpoint_is_refused_by_test(trained, tmp_path, capsys, part):
    path = spoiled(trained, tmp_path, part, float("inf") if part == "adapter" else float("nan"))
    argv = ["test", "--config", str(trained["config"]), "--ckpt_path", str(path)]
    assert cli.main(argv) == 1
    assert_names_the_tensor(one_line_error(capsys), path, part)


@pytest.mark.parametrize("command", ["validate", "predict", "fit"])
def test_non_finite_checkpoint_is_refused_by_every_loading_command(
    trained, tmp_path, capsys, command
):
    path = spoiled(trained, tmp_path, "prompt")
    argv = [command, "--config", str(trained["config"]), "--ckpt_path", str(path)]
    argv += ["--run_dir", str(tmp_path / "elsewhere")]
    assert cli.main(argv) == 1
    assert_names_the_tensor(one_line_error(capsys), path, "prompt")


@pytest.mark.parametrize("part", sorted(PARTS))
def test_non_finite_checkpoint_is_refused_by_export(trained, tmp_path, capsys, part):
    path = spoiled(trained, tmp_path, part)
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(path), "--out", str(out)]) == 1
    assert_names_the_tensor(one_line_error(capsys), path, part)
    assert not out.exists()


def test_a_model_flag_the_checkpoint_overrules_is_refused(trained, capsys):
    argv = ["test", "--config", str(trained["config"]), "--ckpt_path", str(trained["last"])]
    assert cli.main([*argv, "--model.quant", "w8a8"]) == 1
    line = one_line_error(capsys)
    assert "model.quant='w8a8' (checkpoint: 'w4a4')" in line
    assert f"conflicts with --ckpt_path {trained['last']}" in line and "drop it" in line


def test_a_model_flag_against_the_last_checkpoint_is_refused(trained, capsys):
    argv = ["test", "--config", str(trained["config"]), "--run_dir", str(trained["run"])]
    assert cli.main([*argv, "--ckpt_path", "last", "--model.adapter.ratio", "0.5"]) == 1
    line = one_line_error(capsys)
    assert f"checkpoint {trained['last'].resolve()} was trained with other model settings" in line
    assert "model.adapter.ratio: 0.2 in it, 0.5 now" in line


def test_a_config_the_checkpoint_overrules_is_named_in_one_warning(
    trained, tmp_path, caplog, world
):
    model = {"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}, "quant": "w8a8"}
    other = tiny_world.cli_config(world, tmp_path / "w8a8.yaml", model=model)
    argv = ["test", "--config", str(other), "--ckpt_path", str(trained["last"])]
    with caplog.at_level("WARNING", logger="p4q_lightning"):
        assert cli.main([*argv, "--run_dir", str(tmp_path / "eval")]) is None
    named = [r.getMessage() for r in caplog.records if "not the config's" in r.getMessage()]
    assert len(named) == 1 and "model.quant='w8a8' (checkpoint: 'w4a4')" in named[0]


class FullDisk:
    """A file in the checkpoint directory on a disk that fills up after ``room`` bytes."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def fileno(self) -> int:  # not a plain file: copies fall back to write()
        raise OSError(errno.EBADF, "not a plain file")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_failed_checkpoint_write_leaves_the_previous_last_ckpt(
    trained, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"  # its own run: a resume finds its last.ckpt where it wrote it
    argv = ["fit", "--config", str(trained["config"]), "--run_dir", str(run)]
    assert cli.main(argv) is None
    last = run / "checkpoints" / "last.ckpt"
    written = sorted(p.name for p in (run / "checkpoints").iterdir())
    before = last.read_bytes()
    real_open, real_rename = builtins.open, os.rename
    checkpoints = os.path.realpath(run / "checkpoints")

    def is_last(path) -> bool:
        path = os.path.realpath(os.fspath(path))
        return os.path.dirname(path) == checkpoints and "last.ckpt" in os.path.basename(path)

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and "w" in mode and is_last(file):
            return FullDisk(handle, room=4096)
        return handle

    def rename_across_devices(src, dst, *args, **kwargs):
        # a temporary file written anywhere but beside its target is on another file system
        if is_last(dst) and os.path.dirname(os.path.realpath(src)) != checkpoints:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(os, "rename", rename_across_devices)
    assert cli.main([*argv, "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 1
    line = one_line_error(capsys)
    monkeypatch.undo()
    assert last.read_bytes() == before  # the resume point is intact
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert f"cannot write checkpoint {os.path.realpath(last)}: No space left on device" in line
    assert "the previous last.ckpt is kept" in line and "--ckpt_path last" in line
    # the epoch's own checkpoint was written; no half-written temporary file is left behind
    now = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert now == ["epoch=1-step=8.ckpt", "last.ckpt"] and written == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
