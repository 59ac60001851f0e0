"""What the baselines cost next to P4Q: demo-world fit time and the ViT-B/32 training step.

    python benchmarks/baseline_costs.py [--methods p4q kgcoop tip_adapter tip_adapter_f clip_lora]
        [--quant w4a4] [--rounds 2] [--classes 100] [--batch 32] [--steps 3] [--skip-demo]
        [--skip-vitb32] [--config experiments/demo_baselines.yaml]

1. Demo world (``experiments/demo_baselines.yaml``, seed 0): the wall time of ``trainer.fit`` of
   each method (calibration, feature caching, training, validation; no comparison, no logger,
   no feature cache kept from an earlier run) and its ratio to P4Q's, measured in this one run:
   ``--rounds`` rounds of every method in turn, each method's fastest fit (the first round also
   pays the process's warm-up, whichever method comes first).
2. ViT-B/32 (random weights, ``--quant``, ``--classes`` ImageNet class names, batch ``--batch``):
   the median time of one full training step (forward, backward, optimiser step) of P4Q from
   cached image features, and of CLIP-LoRA, whose image tower trains, so each step runs the
   (LoRA) image tower forward and backward on the images, and the text tower on every class.
   Both are the module's own ``training_step``; steps are interleaved.

Run it on an idle machine (``cpu-exclusive``): the ratios, not the seconds, are the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import open_clip
import torch

from p4q_lightning import cli
from p4q_lightning.callbacks import ComparisonCallback
from p4q_lightning.module import P4QModule
from p4q_lightning.training.optim import PromptAdapterOptimizer, param_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "demo_baselines.yaml"


def demo_fit_seconds(method: str, quant: str, root: Path, config: Path = CONFIG) -> float:
    """Wall time of the demo config's ``trainer.fit`` for ``method``."""
    run = cli.cli_main(
        [
            "--config", str(config),
            f"--model.method={method}", f"--model.quant={quant}",
            "--model.features.cache_dir=null",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root / method}",
        ],
        run=False,
    )  # fmt: skip
    trainer = run.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ComparisonCallback)]
    start = time.perf_counter()
    trainer.fit(run.model, run.datamodule)
    return time.perf_counter() - start


def vitb32_step_seconds(args: argparse.Namespace) -> dict[str, float]:
    """Median step time of P4Q (cached features) and CLIP-LoRA (images) on ViT-B/32."""
    names = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(2)]
    steps: dict[str, Any] = {}
    for method in ("p4q", "clip_lora"):
        module = P4QModule("ViT-B-32-quickgelu", None, method=method, quant=args.quant,
                           classnames=names)  # fmt: skip
        model = module.classifier
        model.calibrate(calib, progress=False)
        module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer here
        optimizer = PromptAdapterOptimizer(param_groups(module.classifier, module.optim_args))
        module.train()
        if method == "p4q":
            model.teacher_text_features()  # once per run, not per step
            batch: Any = {
                "student": model.student_image_features(images),
                "teacher": model.teacher_image_features(images),
                "label": labels,
            }
        else:
            batch = (images, labels)
        steps[method] = (module, optimizer, batch)

    def one(method: str) -> float:
        module, optimizer, batch = steps[method]
        start = time.perf_counter()
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.classifier.invalidate_text()
        return time.perf_counter() - start

    for method in steps:
        one(method)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.steps):
        for method in steps:
            times[method].append(one(method))
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    methods = ["p4q", "kgcoop", "tip_adapter", "tip_adapter_f", "clip_lora"]
    p.add_argument("--methods", nargs="*", default=methods)
    p.add_argument("--quant", default="w4a4")
    p.add_argument("--rounds", type=int, default=2, help="fits per method, interleaved")
    p.add_argument("--config", type=Path, default=CONFIG, help="the demo fit's config")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "baseline_costs")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-vitb32", action="store_true")
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}")
    if not args.skip_demo:
        rounds: dict[str, list[float]] = {m: [] for m in args.methods}
        for r in range(args.rounds):
            for m in args.methods:
                root = args.root / f"round{r}"
                rounds[m].append(demo_fit_seconds(m, args.quant, root, args.config))
        seconds = {m: min(t) for m, t in rounds.items()}
        base = seconds.get("p4q")
        print()
        print(f"| demo fit ({args.quant}, seed 0, best of {args.rounds}) | seconds | vs P4Q |")
        print("|---|---|---|")
        for m, s in seconds.items():
            ratio = f"{s / base:.2f}x" if base else ""
            print(f"| {m} | {s:.1f} | {ratio} |")
    if not args.skip_vitb32:
        t = vitb32_step_seconds(args)
        print()
        print(f"| ViT-B/32 {args.quant}, {args.classes} classes, batch {args.batch} | step (s) |")
        print("|---|---|")
        print(f"| P4Q (cached image features) | {t['p4q']:.3f} |")
        print(f"| CLIP-LoRA (image tower trains) | {t['clip_lora']:.3f} |")
        print(f"| CLIP-LoRA / P4Q | {t['clip_lora'] / t['p4q']:.2f}x |")


if __name__ == "__main__":
    main()
