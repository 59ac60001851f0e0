"""A fit interrupted mid-epoch and resumed from its last checkpoint ends exactly where the
uninterrupted fit ends: same prompt, adapter (weights and quantizer ranges) and metrics, whether
the checkpoint is from the end of the last epoch or from the middle of the current one
(``every_n_train_steps``: the resumed epoch skips the batches it already trained on)."""

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
# with a checkpoint after every step, last.ckpt holds step 10: 2 of the third epoch's 4 batches
MID_EPOCH_STOP = 2 * STEPS_PER_EPOCH + 2


def fit_config(
    world,
    tmp: Path,
    callbacks: list | None = None,
    views: int = 3,
    every_step: bool = False,
    num_workers: int = 0,
) -> Path:
    """The tiny fit; ``every_step``: checkpoint after every training step (mid-epoch ones)."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(tmp / "ckpt"),
            "save_last": True,
            **({"every_n_train_steps": 1} if every_step else {}),
        },
    }
    data = {
        "class_path": "tiny_world.TinyDataModule",
        "init_args": {"root": str(world["data"]), "num_workers": num_workers},
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
        data=data,
    )


def assert_mid_epoch(checkpoint: Path) -> None:
    """``checkpoint`` was saved inside the third epoch, after 2 of its 4 batches."""
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert saved["epoch"] == 2 and saved["global_step"] == MID_EPOCH_STOP


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


def test_resume_after_sigkill_from_a_mid_epoch_checkpoint(world, tmp_path, uninterrupted):
    """Killed in the third epoch with a checkpoint after every step: the resumed fit goes on
    with the third epoch's last two batches, not its first two again."""
    stop = {
        "class_path": "resume_helpers.StopAtStep",
        "init_args": {"step": MID_EPOCH_STOP, "how": "sigkill"},
    }
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    killed = subprocess.run(
        [sys.executable, "-m", "p4q_lightning", "fit", "--config"]
        + [str(fit_config(world, tmp_path, [stop], every_step=True))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert_mid_epoch(tmp_path / "ckpt" / "last.ckpt")
    config = fit_config(world, tmp_path, every_step=True)
    assert_same(run(["fit", "--config", str(config), "--ckpt_path", "last"]), uninterrupted)


def test_resume_with_live_augmentation_from_a_mid_epoch_checkpoint(world, tmp_path, monkeypatch):
    """``features.views: 0``: every step crops images live, in a loader worker; the order and
    the crops come from (seed, epoch, index), so the fit resumed in the middle of the third
    epoch sees the same images as the uninterrupted one (the worker, which draws its indices as
    soon as the loader is iterated, gets the resumed epoch's order too)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    live = {"views": 0, "every_step": True, "num_workers": 1}
    reference = run(["fit", "--config", str(fit_config(world, whole, **live))])
    stop = {"class_path": "resume_helpers.StopAtStep", "init_args": {"step": MID_EPOCH_STOP}}
    with pytest.raises(Interrupted):
        cli.cli_main(["fit", "--config", str(fit_config(world, interrupted, [stop], **live))])
    assert_mid_epoch(interrupted / "ckpt" / "last.ckpt")
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    config = fit_config(world, interrupted, **live)
    assert_same(run(["fit", "--config", str(config), "--ckpt_path", "last"]), reference)
