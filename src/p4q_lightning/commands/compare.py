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
``sweep.png``, and prints the markdown table; the reports papers print (per-dataset table with
the average, few-shot curves, base/new/HM, domain generalisation, accuracy vs bits: see
:mod:`p4q_lightning.reports`) are written beside them where the runs have their shape, and
``--wandb`` logs all of it to one W&B run.

Trained runs are never merged: runs of one method and bits whose saved configs differ in a
setting (a learning rate, the epochs, ...) form their own groups, the setting shown beside the
method; two runs that differ in nothing but their directory are duplicates and are reported in
one warning line (the first named counts). The dataset is named as in the run directories
(``synthetic-0``, ``imagenet-1k``).
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
from p4q_lightning.rundir import FIT_CONFIG, dataset_label, identity

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
    "setting",
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
    "setting",
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
# rows every run of a seed reports alike, counted once per experiment, bits and seed
# (ComparisonCallback's FP_METHOD and PTQ_METHOD; not imported, to keep this command light)
BASELINES = ("fp32 zero-shot", "ptq")
# what a run's identity already names, or what cannot change its result: never a "setting"
SEED_KEYS = ("seed_everything", "data.seed")
NEUTRAL_KEYS = (
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.split_dir",
    "data.hub.cache_dir",
    "model.features.cache_dir",
    "model.prompt.chunk_size",
    "model.prompt.checkpointing",
)
# the trainer options that change what is trained (devices, loggers, paths do not)
TRAINER_KEYS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "limit_train_batches",
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)
# written by `p4q import-official` into its run directory: where the weights came from
ORIGIN_FILE = "imported.json"


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


def _run_dir(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "comparison" else path.parent


def _run_name(path: Path) -> str:
    return str(_run_dir(path))


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value, sort_keys=True) if isinstance(value, list) else str(value)}


def run_config(run: Path) -> dict[str, Any] | None:
    """The run's saved LightningCLI config (the fit's ``config.yaml``, else an evaluation's
    ``config-<stage>.yaml``), or None."""
    import yaml

    candidates = [run / FIT_CONFIG, *sorted(run.glob("config-*.yaml"))]
    for path in candidates:
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, ValueError):  # yaml.YAMLError is a ValueError
            continue
        if isinstance(config, dict):
            return config
    return None


def run_settings(run: Path, config: dict[str, Any] | None) -> dict[str, str] | None:
    """The settings that make a run what it is, flat (``model.optim.prompt_lr``), or None when
    the run directory saved no config."""
    if config is None:
        return None
    data = config.get("data") or {}
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        data = {"class_path": data.get("class_path"), **data["init_args"]}
    trainer = config.get("trainer") or {}
    settings = {
        **_flatten(config.get("model") or {}, "model"),
        **_flatten(data, "data"),
        **{f"trainer.{k}": str(trainer.get(k)) for k in TRAINER_KEYS if k in trainer},
    }
    try:
        origin = json.loads((run / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        origin = None
    if isinstance(origin, dict) and origin.get("origin"):
        settings["origin"] = str(origin["origin"])
    return {k: v for k, v in settings.items() if k not in SEED_KEYS + NEUTRAL_KEYS}


def _dataset_name(run: dict[str, Any], config: dict[str, Any] | None) -> str:
    """The dataset as the run directory names it (``synthetic-0``, ``imagenet-1k``)."""
    if config is not None and config.get("data"):
        return identity(config).dataset
    half = run.get("subsample_classes")
    suffix = f"-{half}" if half in (BASE, NEW) else ""
    return dataset_label(run.get("dataset") or "unknown") + suffix


def load_rows(
    files: Iterable[Path],
) -> tuple[list[dict[str, Any]], list[str], dict[str, dict[str, str] | None]]:
    """Every comparison row, tagged with its run's experiment; the unreadable files; each run's
    settings (None: no saved config)."""
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    settings: dict[str, dict[str, str] | None] = {}
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
        config = run_config(_run_dir(f))
        name = _run_name(f)
        settings[name] = run_settings(_run_dir(f), config)
        own = run_rows[0].get("test_set") if run_rows else None
        raw = run.get("dataset")
        for r in run_rows:
            if r.get("test_set") == HM:  # recomputed from the mean base and new accuracy
                continue
            test_set = r.get("test_set") or raw  # older files: one test set
            if raw is not None and test_set == raw:  # the run's own, spelt as everywhere
                test_set = dataset_label(raw)
            rows.append(
                {
                    "run": name,
                    "dataset": _dataset_name(run, config),
                    "model": run.get("model"),
                    "experiment_shots": shots,
                    "seed": run.get("seed"),
                    "setting": "",
                    **r,
                    "test_set": test_set,
                    "own_test_set": own is None or r.get("test_set") == own,
                }
            )
    return rows, bad, settings


KEY = ("dataset", "model", "experiment_shots", "test_set", "method", "bits", "setting")


def _key(r: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(r[k]) for k in KEY)


def _label_settings(rows: list[dict[str, Any]], settings: dict[str, dict[str, str] | None]) -> None:
    """Name, on each trained row, the settings in which its run differs from the other runs of
    the same experiment, method and bits (seeds aside)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] not in BASELINES:
            groups.setdefault(_key(r), []).append(r)
    for members in groups.values():
        known = {r["run"]: settings.get(r["run"]) for r in members}
        configs = [s for s in known.values() if s is not None]
        keys = sorted({k for s in configs for k in s})
        differing = [k for k in keys if len({s.get(k) for s in configs}) > 1]
        for r in members:
            own = known[r["run"]]
            if own is not None and differing:
                r["setting"] = ", ".join(
                    f"{k.split('.', 1)[-1]}={own.get(k, 'unset')}" for k in differing
                )


def dedupe(
    rows: list[dict[str, Any]], settings: dict[str, dict[str, str] | None] | None = None
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Baselines count once per experiment, test set, bits and seed; trained runs that differ in
    a setting stay apart (their ``setting`` names it). Returns the rows and the groups of runs
    that are duplicates of one another (the first named counts); a run without a saved config
    is told apart by its directory."""
    settings = settings or {}
    _label_settings(rows, settings)
    seen: dict[tuple[str, ...], dict[str, Any]] = {}
    duplicates: dict[str, list[str]] = {}  # first run -> the runs that repeat it
    kept: list[dict[str, Any]] = []
    for r in rows:
        key = (*_key(r), str(r["seed"]))
        first = seen.get(key)
        if first is None:
            seen[key] = r
            kept.append(r)
            continue
        if r["method"] in BASELINES or r["run"] == first["run"]:
            continue
        if settings.get(r["run"]) is None or settings.get(first["run"]) is None:
            r["setting"] = f"run={r['run']}"  # nothing says they are the same: keep both
            first["setting"] = first["setting"] or f"run={first['run']}"
            seen[(*_key(r), str(r["seed"]))] = r
            kept.append(r)
            continue
        group = duplicates.setdefault(first["run"], [first["run"]])
        if r["run"] not in group:  # once, however many test sets the runs share
            group.append(r["run"])
    return kept, list(duplicates.values())


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
                "setting": first.get("setting", ""),
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
            str(r.get("setting", "")),
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


def method_label(r: dict[str, Any]) -> str:
    """The method, with the setting that tells its group apart (``p4q [optim.prompt_lr=0.01]``)."""
    return f"{r['method']} [{r['setting']}]" if r.get("setting") else str(r["method"])


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
            f"| {r['dataset']} | {cell}{r['model']} | {r['experiment_shots']} | "
            f"{method_label(r)} | "
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
    parser.add_argument(
        "--wandb",
        nargs="?",
        const="p4q-compare",
        default=None,
        metavar="PROJECT",
        help="also log the tables and figures to W&B (project, default p4q-compare)",
    )
    args = parser.parse_args(argv)
    files, skipped = find_results(args.runs)
    rows, bad, settings = load_rows(files)
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
    rows, duplicates = dedupe(rows, settings)
    if duplicates:
        log.warning(
            "p4q compare: %d run(s) repeat another run's settings and seed, counted once: %s",
            sum(len(group) - 1 for group in duplicates),
            "; ".join(f"{', '.join(group[1:])} (same as {group[0]})" for group in duplicates[:5])
            + ("; ..." if len(duplicates) > 5 else ""),
        )
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary)
    write_csv(args.out / "sweep.csv", rows, RAW_COLUMNS)
    write_csv(args.out / "summary.csv", summary, SUMMARY_COLUMNS)
    with atomic_write(args.out / "summary.md") as tmp:
        tmp.write_text(table)
    from p4q_lightning.plots import accuracy_vs_bits_and_shots

    own = [r for r in summary if r.get("own_test_set", True)]  # one test set per experiment
    plotted = [{**r, "method": method_label(r)} for r in own]
    accuracy_vs_bits_and_shots(plotted, args.out / "sweep.png")
    from p4q_lightning.reports import dataset_markdown, dataset_tables, write_reports

    reports = write_reports(summary, args.out)
    runs = len(files) - len(bad)
    sys.stdout.write(f"{runs} runs, {len(rows)} rows (mean ± std over seeds)\n\n{table}")
    if len({r["dataset"] for r in own}) > 1:  # CoOp's layout: a column per dataset + average
        sys.stdout.write("\n" + dataset_markdown(dataset_tables(summary)))
    names = ["sweep.csv", "summary.csv", "summary.md", "sweep.png"]
    written = ", ".join([*(str(args.out / n) for n in names), *map(str, reports.values())])
    sys.stdout.write(f"\nwrote {written}\n")
    if args.wandb:
        from p4q_lightning.reports import log_to_wandb
        from p4q_lightning.rundir import sweep_group
        from p4q_lightning.wandb_mode import resolve_wandb_mode

        resolve_wandb_mode()
        files_out = {"summary_csv": args.out / "summary.csv", "sweep_png": args.out / "sweep.png"}
        log_to_wandb({**files_out, **reports}, args.wandb, sweep_group())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
