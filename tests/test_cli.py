"""The command line: LightningCLI fit/test/predict/--print_config, sub-command dispatch, W&B
offline fallback, and a DDP fit on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import tiny_world
from p4q_lightning import cli

TESTS = Path(__file__).resolve().parent


def tiny_config(world, tmp: Path, **trainer) -> Path:
    return tiny_world.cli_config(world, tmp / "tiny.yaml", trainer, {"feature_views": 2})


def test_fit_test_predict_through_the_cli(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tiny_config(world, tmp_path, enable_checkpointing=True)
    fit = cli.cli_main(["fit", "--config", str(config)])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file() and Path(ckpt).stat().st_size < 2**20
    test = cli.cli_main(["test", "--config", str(config), "--ckpt_path", ckpt])
    assert "test/top1" in test.trainer.callback_metrics
    pred = cli.cli_main(["predict", "--config", str(config), "--ckpt_path", ckpt])
    assert pred.trainer.predict_loop.predictions is not None


def test_print_config(world, tmp_path, capsys):
    config = tiny_config(world, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"] == tiny_world.MODEL_NAME
    assert printed["model"]["method"] == "p4q"


def test_subcommands_dispatch_to_their_modules(monkeypatch):
    seen = {}
    fake = types.ModuleType("p4q_lightning.commands.demo")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p4q_lightning.commands.demo", fake)
    cli.main(["demo", "--seed", "3"])
    assert seen["argv"] == ["--seed", "3"]


def test_missing_subcommand_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "frobnicate"))
    with pytest.raises(SystemExit, match="not available yet"):
        cli.main(["frobnicate"])


def test_cli_picks_the_wandb_mode_before_building_loggers(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(cli, "resolve_wandb_mode", lambda: seen.append("resolved") or "offline")
    monkeypatch.setattr(cli, "cli_main", lambda args: seen.append("cli"))
    cli.main(["fit", "--help"])
    assert seen == ["resolved", "cli"]


def test_ddp_two_cpu_processes_fit_to_the_end(world, tmp_path):
    """`strategy: ddp` with devices=2 on CPU (gloo): every rank ends with the same state."""
    out = tmp_path / "agreement.json"
    config = tiny_config(
        world,
        tmp_path,
        strategy="ddp",
        devices=2,
        max_epochs=2,
        callbacks=[{"class_path": "tiny_world.RankAgreement", "init_args": {"out": str(out)}}],
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "p4q_lightning", "fit", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["agree"], result
    assert result["global_step"] == 4  # 32 images / (8 per batch x 2 ranks) x 2 epochs
    assert 0.0 <= result["val_top1"] <= 1.0
