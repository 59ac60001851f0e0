"""The demo world's baselines table: every method x bit width x seed, mean ± std over seeds.

    python benchmarks/demo_baselines.py [--sweep experiments/sweeps/demo_baselines.yaml]
        [--root runs/demo_baselines] [--methods ...] [--quants ...] [--seeds ...]
        [--epochs N] [--dry-run]

Expands the W&B sweep file's grid (``method: grid``, the values of each parameter) itself and
runs each point as the sweep's command would, with the existing CLI: ``p4q fit --config
<config> --<param>=<value> ...``; the config's ComparisonCallback tests the run after fit
and writes ``comparison/comparison.csv``. Points that run the same model (``coop`` at every
``model.quant``: it is the float model) run once. A point whose comparison exists is read, not
run again, so an interrupted grid resumes. Prints the methods x bits table of test top-1
(mean ± std over seeds, n runs) with the fp32 zero-shot and PTQ rows every run's comparison
holds, and writes every run's figure to ``<root>/demo_baselines.csv``.

Accuracy does not depend on machine load; the per-run fit times it prints do (the cost ratios
the README quotes come from ``benchmarks/baseline_costs.py``, measured on an idle machine).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from p4q_lightning.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweeps" / "demo_baselines.yaml"
ORDER = ["fp32 zero-shot", "ptq", "coop", "p4q", "kgcoop", "tip_adapter", "tip_adapter_f",
         "clip_lora"]  # fmt: skip
BITS = {"fp": "fp32"}


def grid(sweep: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The sweep's config path and its grid points (dicts of parameter -> value)."""
    if sweep.get("method") != "grid":
        raise ValueError(f"the sweep's method is {sweep.get('method')!r}; this script runs grids")
    command = [str(c) for c in sweep["command"]]
    config = command[command.index("--config") + 1]
    params = sweep["parameters"]
    names = list(params)
    points = [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(params[n]["values"] for n in names))
    ]
    # seeds outermost, then the lowest bit width first, so a partial grid has every method at
    # the first seed's w4a4 (the comparison that matters most) before anything else
    quants = list(params.get("model.quant", {}).get("values", []))[::-1]
    points.sort(
        key=lambda p: (
            p.get("seed_everything", 0),
            quants.index(p["model.quant"]) if p.get("model.quant") in quants else 0,
        )
    )
    return [config], points


def run_key(point: dict[str, Any]) -> tuple[str, str, int]:
    """(method, bits, seed): points with the same key run the same model."""
    method = point["model.method"]
    quant = str(point["model.quant"]) if METHODS[method].quantized else "fp"
    return method, BITS.get(quant, quant), int(point.get("seed_everything", 0))


def point_dir(root: Path, key: tuple[str, str, int]) -> Path:
    method, bits, seed = key
    return root / f"{method}-{bits}-seed{seed}"


def comparison(directory: Path) -> Path | None:
    found = sorted(directory.glob("**/comparison/comparison.csv"))
    return found[0] if found else None


def run_point(config: str, point: dict[str, Any], directory: Path, epochs: int | None) -> float:
    """Fit one grid point with the CLI (its comparison is written after fit); seconds taken."""
    args = [f"--{name}={value}" for name, value in point.items()]
    extra = [
        f"--trainer.default_root_dir={directory}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    if epochs is not None:
        extra.append(f"--trainer.max_epochs={epochs}")
    command = [sys.executable, "-m", "p4q_lightning", "fit", "--config", config, *args, *extra]
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(directory / "fit.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: see {directory / 'fit.log'}")
    return time.perf_counter() - start


def rows_of(path: Path, method: str) -> dict[str, dict[str, str]]:
    """The run's own rows (its method, ptq and fp32 zero-shot) on its own test split."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    own = rows[0].get("test_set") if rows else None
    wanted = {method, "ptq", "fp32 zero-shot"}
    return {r["method"]: r for r in rows if r["method"] in wanted and r.get("test_set") == own}


def table(results: list[dict[str, Any]], bits: list[str]) -> str:
    """Markdown: methods x bits, top-1 mean ± std over seeds (n)."""
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in results:
        cells.setdefault((r["method"], r["bits"]), {})[r["seed"]] = r["top1"]
    lines = ["| method | " + " | ".join(bits) + " |", "|---" * (len(bits) + 1) + "|"]
    for method in ORDER:
        if not any((method, b) in cells for b in bits):
            continue
        out = []
        for b in bits:
            values = list(cells.get((method, b), {}).values())
            if not values:
                out.append("")
                continue
            mean = 100 * statistics.fmean(values)
            if len(values) == 1:  # no spread from one run
                out.append(f"{mean:.1f} (1)")
                continue
            out.append(f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} ({len(values)})")
        lines.append(f"| {method} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", type=Path, default=SWEEP)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "demo_baselines")
    parser.add_argument("--methods", nargs="*", help="only these values of model.method")
    parser.add_argument("--quants", nargs="*", help="only these values of model.quant")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--epochs", type=int, help="override trainer.max_epochs (smoke runs)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    parser.add_argument(
        "--read-only", action="store_true", help="tabulate the runs already done, run nothing"
    )
    args = parser.parse_args(argv)
    sweep = yaml.safe_load(args.sweep.read_text())
    (config,), points = grid(sweep)
    if args.methods:
        points = [p for p in points if p["model.method"] in args.methods]
    if args.quants:
        points = [p for p in points if str(p["model.quant"]) in args.quants]
    if args.seeds:
        points = [p for p in points if int(p.get("seed_everything", 0)) in args.seeds]
    seen: set[tuple[str, str, int]] = set()
    results: list[dict[str, Any]] = []
    baselines: dict[tuple[str, str, int], float] = {}
    for point in points:
        key = run_key(point)
        if key in seen:
            continue
        seen.add(key)
        directory = point_dir(args.root, key)
        if args.dry_run:
            print(" ".join(f"--{k}={v}" for k, v in point.items()), "->", directory)
            continue
        path = comparison(directory)
        seconds = None
        if path is None and args.read_only:
            continue
        if path is None:
            seconds = run_point(config, point, directory, args.epochs)
            path = comparison(directory)
            if path is None:
                raise RuntimeError(f"the fit of {directory} wrote no comparison.csv")
        method, bits, seed = key
        rows = rows_of(path, method)
        results.append({"method": method, "bits": bits, "seed": seed,
                        "top1": float(rows[method]["top1"]), "fit_s": seconds})  # fmt: skip
        for other in ("ptq", "fp32 zero-shot"):
            if other in rows and (other == "ptq" or bits == "fp32"):
                row_bits = bits if other == "ptq" else "fp32"
                baselines[(other, row_bits, seed)] = float(rows[other]["top1"])
        took = f" in {seconds:.0f} s" if seconds is not None else " (read back)"
        print(f"{method} {bits} seed {seed}: top-1 {results[-1]['top1']:.4f}{took}", flush=True)
    if args.dry_run:
        return
    for (method, bits, seed), top1 in baselines.items():
        results.append({"method": method, "bits": bits, "seed": seed, "top1": top1, "fit_s": None})
    args.root.mkdir(parents=True, exist_ok=True)
    with open(args.root / "demo_baselines.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "bits", "seed", "top1", "fit_s"])
        writer.writeheader()
        writer.writerows(results)
    quants = [BITS.get(str(q), str(q)) for q in sweep["parameters"]["model.quant"]["values"]]
    print()
    print("Test top-1 (%) on the demo world, mean ± std over seeds (runs):")
    print()
    print(table(results, quants))


if __name__ == "__main__":
    main()
