"""Two DDP processes (gloo, CPU) with B images each train exactly what one process with 2 x B
images trains with live augmentation: the same prompt initialisation, the same sample order and
crops, the same adapter range updates, although each DDP rank encodes only half of the class
prompts (gathered with gradient). (With cached features, the shipped callbacks and the default
observers: test_ddp_shipped_config.py.) Tolerance: float rounding of the gradient all-reduce
and of batched matmuls of different batch sizes only (rtol 1e-5, atol 1e-6; measured max |Δ|
1.5e-8 after 4 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import tiny_world
from p4q_lightning import cli
from resume_helpers import trained_state

TESTS = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6


def config(
    world, tmp: Path, devices: int, batch_size: int, callbacks: list | None = None, views: int = 2
) -> Path:
    trainer = {
        "devices": devices,
        "max_epochs": 2,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp / f"devices{devices}"),  # two runs, two run directories
        "callbacks": callbacks or [],
        **({"strategy": "ddp"} if devices > 1 else {}),
    }
    model = {
        "quant_overrides": tiny_world.MINMAX,
        "feature_views": views,
        "prompt_lr": 0.05,
        "adapter_lr": 0.01,
    }
    data = {
        "class_path": "tiny_world.TinyDataModule",
        "init_args": {"root": str(world["data"]), "batch_size": batch_size},
    }
    return tiny_world.cli_config(world, tmp / f"fit{devices}.yaml", trainer, model, data)


def fit_ddp(world, tmp_path, views: int = 2) -> dict:
    """A two-process fit (8 images per rank per step) in a subprocess; what it trained."""
    out = tmp_path / "ddp_state.pt"
    save = {"class_path": "resume_helpers.SaveTrainedState", "init_args": {"out": str(out)}}
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    ddp = subprocess.run(
        [sys.executable, "-m", "p4q_lightning", "fit", "--config"]
        + [str(config(world, tmp_path, 2, 8, [save], views))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_close_states(ddp_state: dict, state: dict) -> None:
    assert state.keys() == ddp_state.keys()
    worst = {k: float((ddp_state[k].double() - v.double()).abs().max()) for k, v in state.items()}
    for key, value in state.items():
        assert torch.allclose(ddp_state[key], value, rtol=RTOL, atol=ATOL), (key, worst)


def test_ddp_equals_one_process_with_live_augmentation(world, tmp_path, monkeypatch):
    """``features.views: 0``: each rank crops its half of every global batch live; the crops
    come from (seed, epoch, image), so the two ranks together see what one process sees."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    ddp_result = fit_ddp(world, tmp_path, views=0)
    single = cli.cli_main(["fit", "--config", str(config(world, tmp_path, 1, 16, views=0))])
    assert ddp_result["global_step"] == single.trainer.global_step == 4
    assert ddp_result["views_encoded"] is None  # nothing cached
    assert_close_states(ddp_result["state"], trained_state(single.model))
