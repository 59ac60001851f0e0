"""CLIP-LoRA's deployment forms on the demo world: float side branch vs merged and re-quantized.

    python benchmarks/lora_merge.py [--quants w8a8 w4a4] [--seed 0]
        [--config experiments/demo_baselines.yaml]

For each preset, fits CLIP-LoRA with ``experiments/demo_baselines.yaml`` (no logger, no
comparison), then scores the test split three ways: the PTQ student before training, the
trained student with the LoRA factors as a float side branch (what this project runs and keeps
in checkpoints), and the factors merged into the float weights (``W + alpha/r * B A`` per q, k,
v) and the merged model quantized and calibrated again from scratch, as a low-bit file would
hold it. Prints top-1 and the low-bit size of each form (side branch: the PTQ student plus the
float32 factors; merged: a plain PTQ student of the same architecture).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from p4q_lightning import cli
from p4q_lightning.callbacks import ComparisonCallback
from p4q_lightning.export.writer import estimate_lowbit_nbytes
from p4q_lightning.model.classifier import P4QClassifier
from p4q_lightning.model.lora import LoRAInProj, lora_disabled, lora_parameters
from p4q_lightning.quant.calibrate import CALIB_BATCH_SIZE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "demo_baselines.yaml"


@torch.no_grad()
def top1(model: P4QClassifier, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    model.invalidate_text()
    model.freeze_eval_text()
    correct = total = 0
    for images, labels in loader:
        correct += int((model.student_logits(images).argmax(-1) == labels).sum())
        total += int(labels.shape[0])
    model.invalidate_text()
    return correct / total


@torch.no_grad()
def merged_teacher(trained: P4QClassifier) -> torch.nn.Module:
    """The float teacher with every LoRA update added to its packed q/k/v weight."""
    merged = copy.deepcopy(trained.teacher)
    for name, module in trained.student.named_modules():
        if isinstance(module, LoRAInProj):
            attn = merged.get_submodule(name.rsplit(".", 1)[0])  # the nn.MultiheadAttention
            attn.in_proj_weight.add_(module.delta_weight().to(attn.in_proj_weight.dtype))
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quants", nargs="*", default=["w8a8", "w4a4"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "lora_merge")
    p.add_argument("--config", type=Path, default=CONFIG, help="the CLIP-LoRA fit's config")
    args = p.parse_args()
    print("| preset | PTQ (before) | LoRA side branch | merged + re-quantized "
          "| size side branch (MB) | size merged (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for quant in args.quants:
        run = cli.cli_main(
            [
                "--config", str(args.config), "--model.method=clip_lora", f"--model.quant={quant}",
                f"--seed_everything={args.seed}", "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={args.root / quant}",
            ],
            run=False,
        )  # fmt: skip
        trainer, module, dm = run.trainer, run.model, run.datamodule
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ComparisonCallback)]
        trainer.fit(module, dm)
        trained = module.classifier
        dm.setup("test")  # fit set up the training and validation splits only
        test = dm.test_dataloader()
        test = test[0] if isinstance(test, list) else test
        with lora_disabled(trained.student):
            before = top1(trained, test)
        side = top1(trained, test)
        merged = P4QClassifier(
            merged_teacher(trained),
            trained.tokenizer,
            method="ptq",
            quant_spec=trained.quant_spec,
            logit_scale=trained.fixed_logit_scale,
            templates=trained.templates,
        )
        merged.set_classes(trained.classnames)
        merged.calibrate(dm.calibration_dataloader(), progress=False, batch_size=CALIB_BATCH_SIZE)
        after = top1(merged, test)
        lora_bytes = sum(p.numel() * 4 for p in lora_parameters(trained.student))
        ptq_bytes = estimate_lowbit_nbytes(trained.student) - lora_bytes
        print(
            f"| {quant} | {100 * before:.1f} | {100 * side:.1f} | {100 * after:.1f} "
            f"| {(ptq_bytes + lora_bytes) / 1e6:.3f} "
            f"| {estimate_lowbit_nbytes(merged.student) / 1e6:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
