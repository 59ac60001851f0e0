"""How far a DDP fit drifts from the one-process fit with the same global batch (CPU, gloo).

    python benchmarks/ddp_drift.py [--presets w4a4 w8a8 p4q-official] [--seeds 0] [--epochs 40]
                                   [--devices 2] [--no-control]

Runs the demo config (``experiments/demo_cpu.yaml``: p4q-tiny on the synthetic world, batch 64,
40 epochs, cached features) once on one process and once on ``--devices`` DDP processes with the
per-device batch divided (64 / devices), for each preset with its default observers, and
prints per preset: whether the calibrated students are identical, the largest relative
difference of the first step's gradients (max |Δ| / max |g|), how far the prompt and the
adapter weights are apart after several epochs (relative L2, ||Δ|| / ||w||), and the P4Q
top-1 on the test split (the comparison after fit) of both runs. As a control, the same
one-process fit with 2 intra-op threads instead of 1 (nothing differs but the order in which
float sums are added up) shows how far float rounding alone moves a fit.

The calibrated student and the first steps agree to float rounding (the test suite checks it:
``tests/training/test_ddp_shipped_config.py``). What remains is float rounding of the gradient
all-reduce, of batched matmuls of other batch sizes and of the class-sharded text tower; the
low-bit fake quantizers turn some of those last-bit differences into a flipped rounding step,
and training compounds them. This script measures what that amounts to; it is not a timing.
The teacher of the synthetic world is pretrained on first use (~2.5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo_cpu.yaml"
GLOBAL_BATCH = 64


SNAPSHOTS = (1, 5, 10, 20, 40)  # epochs after which the prompt and adapter are compared
TRAINED = ("classifier.prompt_learner.ctx", "classifier.adapter.")


class Record(Callback):
    """Writes (rank zero) the calibrated quantizers, the first step's gradients and the
    prompt and adapter after the epochs in :data:`SNAPSHOTS` and at the end to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.record: dict[str, Any] = {"epochs": {}}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["calibrated"] = _cpu(
            {k: v for k, v in pl_module.state_dict().items() if "quantizer." in k}
        )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, *_) -> None:
        if trainer.global_step == 0:
            self.record["grads"] = _cpu(
                {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in SNAPSHOTS or epoch == trainer.max_epochs:
            self.record["epochs"][epoch] = _cpu(
                {k: v for k, v in pl_module.state_dict().items() if k.startswith(TRAINED)}
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["steps"] = trainer.global_step
        if trainer.is_global_zero:
            torch.save(self.record, self.out)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def fit(
    preset: str, devices: int, epochs: int, tmp: Path, threads: int = 1, seed: int = 0
) -> dict[str, Any]:
    """One demo fit (training and split seed ``seed``, world 0); what :class:`Record` wrote
    plus the comparison after fit."""
    name = f"{preset}-{devices}-{threads}-seed{seed}"
    out = tmp / f"{name}.pt"
    demo = yaml.safe_load(DEMO.read_text())
    record = {"class_path": "ddp_drift.Record", "init_args": {"out": str(out)}}
    override = {
        "seed_everything": seed,
        "trainer": {
            "devices": devices,
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": demo["trainer"]["callbacks"] + [record],
            **({"strategy": "ddp"} if devices > 1 else {}),
        },
        "model": {"quant": preset, "features": {"cache_dir": str(tmp / f"features-{name}")}},
        "data": {"init_args": {"batch_size": GLOBAL_BATCH // devices, "seed": seed}},
    }
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(override))
    run = tmp / f"run-{name}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    args = ["fit", "--config", str(DEMO), "--config", str(config), "--run_dir", str(run)]
    done = subprocess.run(
        [sys.executable, "-m", "p4q_lightning", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = torch.load(out, weights_only=True)
    rows = json.loads((run / "comparison" / "comparison.json").read_text())["rows"]
    result["top1"] = {r["method"]: r["top1"] for r in rows}
    return result


def max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest max |a - b| / max |b| over the tensors of two states."""
    return max(
        float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in b
    )


def l2_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> float:
    """||a - b|| / ||b|| over the weights (not the quantizer ranges) of ``part``."""
    keys = [k for k in b if part in k and "quantizer" not in k]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(b[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["w4a4", "w8a8", "p4q-official"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training/split seeds")
    parser.add_argument("--epochs", type=int, default=40, help="the demo's 40 by default")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--no-control", dest="control", action="store_false")
    args = parser.parse_args()
    epochs = [e for e in SNAPSHOTS if e < args.epochs] + [args.epochs]
    n = args.devices
    summary = [
        "| preset | seed | calibrated student | first-step gradients (max rel.) | P4Q top-1, "
        f"1 process | {n} processes | difference | control: 1 process, 2 threads |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    drift = [
        "| preset | seed | run | "
        + " | ".join(f"after {e} epoch{'s' * (e > 1)}" for e in epochs)
        + " |",
        "|---|---:|---|" + "---:|" * len(epochs),
    ]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for preset in args.presets:
            for seed in args.seeds:
                runs = {"1": fit(preset, 1, args.epochs, tmp, seed=seed)}
                runs[f"{n} processes"] = fit(preset, n, args.epochs, tmp, seed=seed)
                if args.control:
                    runs["control"] = fit(preset, 1, args.epochs, tmp, threads=2, seed=seed)
                summary.append(row(preset, seed, runs, n))
                one = runs.pop("1")
                for label, other in runs.items():
                    cells = [
                        f"{l2_relative(other['epochs'][e], one['epochs'][e], 'prompt_learner'):.1e}"
                        f" / {l2_relative(other['epochs'][e], one['epochs'][e], 'adapter'):.1e}"
                        for e in epochs
                    ]
                    drift.append(f"| {preset} | {seed} | {label} | " + " | ".join(cells) + " |")
                print(summary[-1], *drift[-len(runs) :], sep="\n", file=sys.stderr, flush=True)
    print("\n".join(summary))
    print("\nprompt / adapter weights, ||run - 1 process|| / ||1 process||:\n")
    print("\n".join(drift))


def row(preset: str, seed: int, runs: dict[str, dict[str, Any]], n: int) -> str:
    """One line of the summary table: calibration, first step, top-1 of every run."""
    one, many = runs["1"], runs[f"{n} processes"]
    assert all(r["steps"] == one["steps"] for r in runs.values())
    calibrated = one["calibrated"]
    same = all(torch.equal(calibrated[k], many["calibrated"][k]) for k in calibrated)
    top1 = {label: r["top1"]["p4q"] for label, r in runs.items()}
    control = "-"
    if "control" in top1:
        control = f"{top1['control']:.2%} ({100 * (top1['control'] - top1['1']):+.2f})"
    return (
        f"| {preset} | {seed} | {'identical' if same else 'DIFFERENT'} | "
        f"{max_relative(many['grads'], one['grads']):.1e} | {top1['1']:.2%} | "
        f"{top1[f'{n} processes']:.2%} | {100 * (top1[f'{n} processes'] - top1['1']):+.2f} points"
        f" | {control} |"
    )


if __name__ == "__main__":
    main()
