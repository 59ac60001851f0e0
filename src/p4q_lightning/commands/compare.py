"""``p4q compare RUN_DIR|GLOB... [--out DIR]``: gather finished runs into one table and one plot.

Reads every ``comparison.json`` that :class:`~p4q_lightning.callbacks.compare.ComparisonCallback`
wrote under the given run directories, globs or files; anything else given (a stray file, an
empty folder, unreadable JSON) is skipped with one warning line. Rows are grouped by experiment
(dataset, model, shots), test set and method + bits; a baseline that every run of a seed
reports (float zero-shot, PTQ) counts once per seed; top-1/top-5 are the mean and sample std
over seeds (CoOp's result parser reports the same). Runs with several test sets (domain
generalisation, cross-dataset, base-to-novel) give a row per test set; base-to-novel runs also
get ``hm``, the harmonic mean of the mean base and mean new accuracy (CoCoOp's H). Writes
``sweep.csv`` (one row per test set, method, bits and seed), ``summary.csv``, ``summary.md`` and
``sweep.png``, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from p4q_lightning.files import atomic_write, write_csv

log = logging.getLogger(__name__)

RESULT_FILE = "comparison.json"
RAW_COLUMNS = [
    "run",
    "dataset",
    "test_set",
    "model",
    "experiment_shots",
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
    "dataset",
    "test_set",
    "model",
    "experiment_shots",
    "method",
    "bits",
    "w_bits",
    "shots",
    "seeds",
    "top1",
    "top1_std",
    "top5",
    "top5_std",
    "size_mb",
]
METHOD_ORDER = {"fp32 zero-shot": 0, "coop": 1, "ptq": 2, "p4q": 3}
BASE, NEW, HM = "base", "new", "hm"


def _expand(arg: str) -> list[Path]:
    """A shell-quoted glob (``'runs/**/seed*'``) expands here; other paths stay as given."""
    if glob.has_magic(arg):
        return [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
    return [Path(arg)]


def find_results(args: Iterable[str]) -> tuple[list[Path], list[str]]:
    """(``comparison.json`` files found, the paths given that hold none)."""
    found: list[Path] = []
    skipped: list[str] = []
    for arg in args:
        paths = _expand(arg)
        if not paths:
            skipped.append(arg)
        for p in paths:
            if p.is_file() and p.name == RESULT_FILE:
                found.append(p)
            elif p.is_dir() and (hits := sorted(p.rglob(RESULT_FILE))):
                found += hits
            else:
                skipped.append(str(p))
    unique: dict[Path, Path] = {}
    for f in found:  # a run named twice (directly and through its parent) counts once
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), skipped


def _run_name(path: Path) -> str:
    run = path.parent.parent if path.parent.name == "comparison" else path.parent
    return str(run)


def load_rows(files: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every comparison row, tagged with its run's experiment; unreadable files are returned."""
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    for f in files:
        try:
            payload = json.loads(f.read_text())
            run, run_rows = payload.get("run", {}), list(payload["rows"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            bad.append(str(f))
            continue
        shots = run.get("shots")
        if shots is None:  # older files: the trained row carries the run's shots
            shots = max((int(r.get("shots") or 0) for r in run_rows), default=0)
        own = run_rows[0].get("test_set") if run_rows else None
        for r in run_rows:
            if r.get("test_set") == HM:  # recomputed from the mean base and new accuracy
                continue
            test_set = r.get("test_set") or run.get("dataset")  # older files: one test set
            rows.append(
                {
                    "run": _run_name(f),
                    "dataset": run.get("dataset"),
                    "model": run.get("model"),
                    "experiment_shots": shots,
                    "seed": run.get("seed"),
                    **r,
                    "test_set": test_set,
                    "own_test_set": own is None or r.get("test_set") == own,
                }
            )
    return rows, bad


KEY = ("dataset", "model", "experiment_shots", "test_set", "method", "bits")


def _key(r: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(r[k]) for k in KEY)


def dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment, method, bits and seed: a baseline every run reports counts once."""
    unique: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        unique.setdefault((*_key(r), str(r["seed"])), r)
    return list(unique.values())


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each experiment's method and bits (rows already deduped)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for rs in groups.values():
        top1 = [float(r["top1"]) for r in rs]
        top5 = [float(r["top5"]) for r in rs]
        first = rs[0]
        out.append(
            {
                **{k: first[k] for k in ("dataset", "model", "experiment_shots", "test_set")},
                **{k: first[k] for k in ("method", "bits", "w_bits", "shots", "size_mb")},
                "seeds": len(rs),
                "top1": statistics.fmean(top1),
                "top1_std": _std(top1),
                "top5": statistics.fmean(top5),
                "top5_std": _std(top5),
                "own_test_set": first.get("own_test_set", True),
            }
        )
    out += harmonic_means(out)
    out.sort(
        key=lambda r: (
            str(r["dataset"]),
            str(r["model"]),
            int(r["experiment_shots"] or 0),
            not r.get("own_test_set", True),
            str(r["test_set"]),
            -int(r["w_bits"] or 32),
            METHOD_ORDER.get(r["method"], 9),
            int(r["shots"] or 0),
        )
    )
    return out


def harmonic_means(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CoCoOp's H = 2·b·n/(b+n) of the mean base and mean new accuracy of each method."""
    by_key = {_key(r): r for r in summary}
    out = []
    for r in summary:
        if r["test_set"] != BASE:
            continue
        new = by_key.get(tuple(NEW if k == "test_set" else str(r[k]) for k in KEY))
        if new is None:
            continue
        hm = {
            m: 2 * r[m] * new[m] / (r[m] + new[m]) if r[m] + new[m] else 0.0
            for m in ("top1", "top5")
        }
        out.append(
            {
                **r,
                "test_set": HM,
                "seeds": min(r["seeds"], new["seeds"]),
                **hm,
                "top1_std": None,
                "top5_std": None,
                "own_test_set": False,
            }
        )
    return out


def _pct(mean: float, std: float | None, n: int) -> str:
    if std is None or n < 2:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(summary: list[dict[str, Any]]) -> str:
    """The summary table; a ``test set`` column when some run has more than its own."""
    several = any(str(r["test_set"]) != str(r["dataset"]) for r in summary)
    set_head, set_rule = ("test set | ", "---|") if several else ("", "")
    lines = [
        f"| dataset | {set_head}model | shots | method | bits | seeds | top-1 (%) | top-5 (%) | "
        "size (MB) |",
        f"|---|{set_rule}---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        cell = f"{r['test_set']} | " if several else ""
        lines.append(
            f"| {r['dataset']} | {cell}{r['model']} | {r['experiment_shots']} | {r['method']} | "
            f"{r['bits']} | {r['seeds']} | {_pct(r['top1'], r['top1_std'], r['seeds'])} | "
            f"{_pct(r['top5'], r['top5_std'], r['seeds'])} | {float(r['size_mb']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p4q compare", description=__doc__.splitlines()[0].split(": ", 1)[-1]
    )
    parser.add_argument(
        "runs", nargs="+", help="run directories, globs (quoted) or comparison.json files"
    )
    parser.add_argument("--out", type=Path, default=Path("p4q-compare"), help="output directory")
    args = parser.parse_args(argv)
    files, skipped = find_results(args.runs)
    rows, bad = load_rows(files)
    skipped = list(dict.fromkeys(skipped + bad))  # a path named twice is reported once
    if skipped:
        log.warning(
            "p4q compare: skipped %d path(s) holding no run result: %s",
            len(skipped),
            ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
        )
    if not rows:
        parser.error(
            f"no {RESULT_FILE} under the given paths: run `lightning test` (or fit) with "
            "ComparisonCallback first"
        )
    rows = dedupe(rows)
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary)
    write_csv(args.out / "sweep.csv", rows, RAW_COLUMNS)
    write_csv(args.out / "summary.csv", summary, SUMMARY_COLUMNS)
    with atomic_write(args.out / "summary.md") as tmp:
        tmp.write_text(table)
    from p4q_lightning.plots import accuracy_vs_bits_and_shots

    own = [r for r in summary if r.get("own_test_set", True)]  # one test set per experiment
    accuracy_vs_bits_and_shots(own, args.out / "sweep.png")
    runs = len(files) - len(bad)
    sys.stdout.write(f"{runs} runs, {len(rows)} rows (mean ± std over seeds)\n\n{table}")
    written = ", ".join(str(args.out / n) for n in ("sweep.csv", "summary.csv", "summary.md"))
    sys.stdout.write(f"\nwrote {written}, {args.out / 'sweep.png'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
