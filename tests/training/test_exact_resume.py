"""A fit interrupted mid-epoch and resumed from its last checkpoint ends exactly where the
uninterrupted fit ends: same prompt, adapter (weights and quantizer ranges) and metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_world
from p4q_lightning import cli
from resume_helpers import Interrupted, trained_state

TESTS = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # 32 training images, batch 8
STOP = 2 * STEPS_PER_EPOCH + 1  # in the third epoch; last.ckpt holds the end of the second


def fit_config(world, tmp: Path, callbacks: list | None = None, views: int = 3) -> Path:
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
    }
    return tiny_world.cli_config(
        world,
        tmp / "fit.yaml",
        trainer={"max_epochs": 3, "callbacks": [checkpoint, *(callbacks or [])]},
        model={
            "quant_overrides": tiny_world.MINMAX,
            "feature_views": views,
            "prompt_lr": 0.05,
            "adapter_lr": 0.01,
        },
    )


def run(args: list[str]):
    result = cli.cli_main(args)
    trainer = result.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return trained_state(result.model), metrics, trainer.global_step


def assert_same(resumed, reference) -> None:
    state, metrics, steps = resumed
    ref_state, ref_metrics, ref_steps = reference
    assert steps == ref_steps == 3 * STEPS_PER_EPOCH
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    assert metrics == ref_metrics and "val/top1" in metrics


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return run(["fit", "--config", str(fit_config(world, tmp))])


def test_resume_after_an_exception_mid_epoch(world, tmp_path, uninterrupted, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    stop = {"class_path": "resume_helpers.StopAtStep", "init_args": {"step": STOP}}
    with pytest.raises(Interrupted):
        cli.cli_main(["fit", "--config", str(fit_config(world, tmp_path, [stop]))])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    resumed = run(["fit", "--config", str(fit_config(world, tmp_path)), "--ckpt_path", "last"])
    assert_same(resumed, uninterrupted)


def test_resume_after_sigkill_of_the_process(world, tmp_path, uninterrupted):
    stop = {
        "class_path": "resume_helpers.StopAtStep",
        "init_args": {"step": STOP, "how": "sigkill"},
    }
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    killed = subprocess.run(
        [sys.executable, "-m", "p4q_lightning", "fit", "--config"]
        + [str(fit_config(world, tmp_path, [stop]))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(["fit", "--config", str(fit_config(world, tmp_path)), "--ckpt_path", "last"])
    assert_same(resumed, uninterrupted)


def test_resume_with_live_augmentation_after_an_exception(world, tmp_path, monkeypatch):
    """``features.views: 0``: every step crops images live; the order and the crops come from
    (seed, epoch, index), so the resumed fit sees the same images as the uninterrupted one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    reference = run(["fit", "--config", str(fit_config(world, whole, views=0))])
    stop = {"class_path": "resume_helpers.StopAtStep", "init_args": {"step": STOP}}
    with pytest.raises(Interrupted):
        cli.cli_main(["fit", "--config", str(fit_config(world, interrupted, [stop], views=0))])
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    config = fit_config(world, interrupted, views=0)
    assert_same(run(["fit", "--config", str(config), "--ckpt_path", "last"]), reference)
