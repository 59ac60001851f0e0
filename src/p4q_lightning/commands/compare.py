"""``p4q compare RUN_DIR... [--out DIR]``: gather finished runs into one table and one plot.

Reads every ``comparison.json`` that :class:`~p4q_lightning.callbacks.compare.ComparisonCallback`
wrote under the given run directories (or the JSON files themselves), averages rows of the
same method, bits and shots over runs (seeds), prints a markdown table and writes
``sweep.csv`` (every row), ``summary.csv`` and ``sweep.png`` (accuracy vs bits and vs shots).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RAW_COLUMNS = [
    "run",
    "model",
    "dataset",
    "seed",
    "method",
    "bits",
    "w_bits",
    "a_bits",
    "shots",
    "top1",
    "top5",
    "size_mb",
    "n_test",
]
SUMMARY_COLUMNS = [
    "model",
    "method",
    "bits",
    "w_bits",
    "shots",
    "runs",
    "top1",
    "top1_std",
    "top5",
    "size_mb",
]


def find_results(paths: Iterable[Path]) -> list[Path]:
    """``comparison.json`` files: given directly or anywhere under the given directories."""
    found: list[Path] = []
    for p in paths:
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("comparison.json"))
        else:
            raise FileNotFoundError(f"{p} is neither a run directory nor a comparison.json file")
    unique: dict[Path, Path] = {}
    for f in found:  # a run named twice (directly and through its sweep directory) counts once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def load_rows(files: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for f in files:
        payload = json.loads(f.read_text())
        run = payload.get("run", {})
        name = f.parent.parent.name if f.parent.name == "comparison" else f.parent.name
        for r in payload["rows"]:
            rows.append(
                {
                    "run": name,
                    "model": run.get("model"),
                    "dataset": run.get("dataset"),
                    "seed": run.get("seed"),
                    **r,
                }
            )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std) over runs of rows sharing model, method, bits and shots."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["bits"], r["shots"]), []).append(r)
    out = []
    for (model, method, bits, shots), rs in groups.items():
        top1 = [float(r["top1"]) for r in rs]
        out.append(
            {
                "model": model,
                "method": method,
                "bits": bits,
                "w_bits": rs[0]["w_bits"],
                "shots": shots,
                "runs": len(rs),
                "top1": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top5": statistics.fmean(float(r["top5"]) for r in rs),
                "size_mb": rs[0]["size_mb"],
            }
        )
    order = {"fp32 zero-shot": 0, "coop": 1, "ptq": 2, "p4q": 3}
    out.sort(
        key=lambda r: (
            str(r["model"]),
            -int(r["w_bits"] or 32),
            order.get(r["method"], 9),
            int(r["shots"] or 0),
        )
    )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | bits | shots | runs | top-1 (%) | top-5 (%) | size (MB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        std = f" ± {100 * r['top1_std']:.2f}" if r["runs"] > 1 else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['bits']} | {r['shots']} | {r['runs']} | "
            f"{100 * r['top1']:.2f}{std} | {100 * r['top5']:.2f} | {float(r['size_mb']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p4q compare", description=__doc__.splitlines()[0].split(": ", 1)[-1]
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories or comparison.json files"
    )
    parser.add_argument("--out", type=Path, default=Path("p4q-compare"), help="output directory")
    args = parser.parse_args(argv)
    try:
        files = find_results(args.runs)
    except FileNotFoundError as e:
        parser.error(str(e))
    if not files:
        parser.error(
            "no comparison.json under the given paths: run `test` with ComparisonCallback first"
        )
    rows = load_rows(files)
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "sweep.csv", rows, RAW_COLUMNS)
    _write_csv(args.out / "summary.csv", summary, SUMMARY_COLUMNS)
    from p4q_lightning.plots import accuracy_vs_bits_and_shots

    accuracy_vs_bits_and_shots(summary, args.out / "sweep.png")
    sys.stdout.write(f"{len(files)} runs, {len(rows)} rows\n\n" + markdown(summary))
    sys.stdout.write(
        f"\nwrote {args.out / 'sweep.csv'}, {args.out / 'summary.csv'}, {args.out / 'sweep.png'}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
