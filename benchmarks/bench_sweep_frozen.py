"""Frozen work once per sweep: the demo-world sweep with and without the frozen-work store.

    python benchmarks/bench_sweep_frozen.py [--epochs 1] [--pretrained synthetic:0|null]
        [--plain 1,8|all] [--out DIR]

The grid is 2 methods (P4Q, float CoOp) x 2 bit widths (w4a4, w8a8) x 2 training seeds (0, 1)
on the demo world (the few-shot split fixed at seed 0), each point one ``p4q run`` process
(as a sweep runs it), at reduced epochs and test set: frozen work is what is measured. Every
point runs with one shared store (``model.features.cache_dir``); the points named by ``--plain``
also run right after without a store (every run computes its calibration, the teacher's class
embeddings and its image features), to compare the frozen seconds and the test top-1.
Per run it prints the seconds spent on frozen work (``results.json``'s ``frozen_seconds``: the
calibration, the teacher's class embeddings and the image features, computed or loaded) and the
ratio to the first stored run's, which entries the run found stored, and whether its test
top-1 equals the run without the store. CoOp's student is the float teacher, so its bit width
changes nothing: its second bit width is the same run again, which a sweep would skip; here it
is run (with its own run directory) to show a repeat of frozen work. The image features depend
on the training seed (their augmented views are drawn from it), so a new seed computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "demo_cpu.yaml"


def point_args(
    method: str, bits: str, seed: int, run_dir: Path, store: Path | None, epochs: int, weights: str
) -> list[str]:
    return [
        "--config", str(CONFIG),
        f"--model.method={method}",
        f"--model.quant={bits}",
        f"--seed_everything={seed}",
        f"--run_dir={run_dir}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.check_val_every_n_epoch=100",
        "--trainer.enable_progress_bar=false",
        "--model.features.views=2",
        "--data.init_args.synthetic.test_per_class=2",
        "--data.init_args.calib_images=256",
        "--trainer.logger=false",
        f"--model.features.cache_dir={store if store is not None else 'null'}",
        f"--model.pretrained={weights}",
    ]  # fmt: skip


def run_point(args: list[str]) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "p4q_lightning", "run", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--run_dir=")))
    return json.loads((run_dir / "results.json").read_text())


def top1(result: dict) -> float:
    return float(result["test"][0]["test/top1"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--pretrained",
        default="synthetic:0",
        help="the teacher's weights (null: random, no pretraining needed; the frozen work "
        "costs the same)",
    )
    p.add_argument(
        "--plain",
        default="1,8",
        help="grid points (1-based) also run without the store, to compare top-1 ('all': every)",
    )
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-frozen-"))
    store = out / "store"
    grid = [(m, b, s) for m in ("p4q", "coop") for b in ("w4a4", "w8a8") for s in (0, 1)]
    every = set(range(1, len(grid) + 1))
    plain_points = every if args.plain == "all" else {int(x) for x in args.plain.split(",")}
    common = (args.epochs, args.pretrained)
    rows = []
    for i, (method, bits, seed) in enumerate(grid, 1):
        name = f"{method}-{bits}-seed{seed}"
        before = {p.name for p in store.glob("*.pt")} if store.exists() else set()
        stored = run_point(point_args(method, bits, seed, out / "stored" / name, store, *common))
        made = sorted(p.name.rsplit("-", 1)[0] for p in store.glob("*.pt") if p.name not in before)
        plain = None
        if i in plain_points:
            plain = run_point(point_args(method, bits, seed, out / "plain" / name, None, *common))
        rows.append(
            {
                "run": i,
                "name": name,
                "plain": sum(plain["frozen_seconds"].values()) if plain else None,
                "stored": sum(stored["frozen_seconds"].values()),
                "computed": ", ".join(made) or "nothing (all loaded)",
                "equal": None if plain is None else top1(plain) == top1(stored),
                "top1": top1(stored),
            }
        )
        sys.stderr.write(f"{i}/{len(grid)} {name}: {rows[-1]['stored']:.2f} s frozen\n")
    first = rows[0]["stored"]
    sys.stdout.write(
        "| run | method-bits-seed | frozen work, store (s) | ratio to run 1 | computed and stored "
        "| frozen work, no store (s) | top-1 equal to no store |\n"
        "|---:|---|---:|---:|---|---:|---|\n"
    )
    for r in rows:
        plain_s = f"{r['plain']:.2f}" if r["plain"] is not None else "-"
        equal = "-" if r["equal"] is None else ("yes" if r["equal"] else "NO")
        sys.stdout.write(
            f"| {r['run']} | {r['name']} | {r['stored']:.2f} | {r['stored'] / first:.1%} | "
            f"{r['computed']} | {plain_s} | {equal} ({100 * r['top1']:.2f}) |\n"
        )
    reused = [r for r in rows[1:] if r["computed"] == "nothing (all loaded)"]
    worst = max((r["stored"] / first for r in reused), default=float("nan"))
    later = sum(r["stored"] for r in rows[1:]) / max(1, len(rows) - 1)
    checked = [r for r in rows if r["equal"] is not None]
    sys.stdout.write(
        f"\nfirst run: {first:.2f} s of frozen work; later runs: {later:.2f} s on average "
        f"({later / first:.1%}); runs that found all of theirs stored: {len(reused)} of "
        f"{len(rows) - 1}, at most {worst:.1%} of the first run's; top-1 equal with and without "
        f"the store: {sum(bool(r['equal']) for r in checked)}/{len(checked)}\n"
    )
    return 0 if all(r["equal"] for r in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
