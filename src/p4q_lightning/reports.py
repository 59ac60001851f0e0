"""The tables and figures papers print, from ``p4q compare``'s summary rows.

- the per-dataset table with the average over datasets (CoOp's layout: a row per method and
  bits, a column per dataset, then the average), one per model and shot count;
- few-shot curves (top-1 vs shots, a line per method and bits, mean ± std over seeds as a band,
  a panel per dataset plus the average: CoOp's Figure 3);
- the base / new / HM table (CoCoOp's Table 1), with the average over datasets;
- the domain-generalisation table (source, each target, the targets' average);
- accuracy vs weight bits per method (a panel per dataset).

Each report is written only when the runs have its shape (several shots, a base/new split, ...).
The summary rows are those of :func:`p4q_lightning.commands.compare.summarize` (accuracies as
fractions); tables hold percentages.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from p4q_lightning.files import atomic_write, write_csv

BASE, NEW, HM = "base", "new", "hm"
HALVES = (BASE, NEW, HM)
AVERAGE = "average"
BASELINES = ("fp32 zero-shot", "ptq")


def label(r: dict[str, Any]) -> str:
    """``p4q w4a4`` (with the setting that tells a group apart, never truncated)."""
    method = f"{r['method']} [{r['setting']}]" if r.get("setting") else str(r["method"])
    return method if str(r["bits"]) in str(r["method"]) else f"{method} {r['bits']}"


def _dataset_root(r: dict[str, Any]) -> str:
    """The dataset without its base-to-novel half (``oxford_pets-base`` -> ``oxford_pets``)."""
    name = str(r["dataset"])
    for half in (BASE, NEW):
        if name.endswith(f"-{half}"):
            return name[: -len(half) - 1]
    return name


def _is_b2n(r: dict[str, Any]) -> bool:
    return str(r["test_set"]) in HALVES


def _own(r: dict[str, Any]) -> bool:
    return bool(r.get("own_test_set", True)) and not _is_b2n(r)


def _pct(mean: float | None, std: float | None = None, n: int = 1) -> str:
    if mean is None:
        return "—"
    if std is None or n < 2:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _order(labels: Iterable[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Methods in the summary's order (baselines first, then by bits)."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(label(r), None)
    return [x for x in seen if x in set(labels)]


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]], right_from: int = 1) -> str:
    rule = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def dataset_tables(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the per-dataset tables: one per model, shots and method+bits, a column per
    dataset (mean top-1) and ``average`` (over the datasets the method has all of)."""
    rows = [r for r in summary if _own(r)]
    out: list[dict[str, Any]] = []
    experiments = sorted({(str(r["model"]), int(r["experiment_shots"] or 0)) for r in rows})
    for model, shots in experiments:
        part = [
            r for r in rows if (str(r["model"]), int(r["experiment_shots"] or 0)) == (model, shots)
        ]
        datasets = sorted({str(r["dataset"]) for r in part})
        for name in _order({label(r) for r in part}, part):
            cells = {str(r["dataset"]): r for r in part if label(r) == name}
            entry: dict[str, Any] = {"model": model, "shots": shots, "method": name}
            for d in datasets:
                entry[d] = cells[d]["top1"] if d in cells else None
                entry[f"{d}_std"] = cells[d]["top1_std"] if d in cells else None
                entry[f"{d}_seeds"] = cells[d]["seeds"] if d in cells else 0
            have = [entry[d] for d in datasets if entry[d] is not None]
            entry[AVERAGE] = statistics.fmean(have) if len(have) == len(datasets) else None
            entry["_datasets"] = datasets
            out.append(entry)
    return out


def dataset_markdown(table: Sequence[dict[str, Any]]) -> str:
    parts = []
    for key in dict.fromkeys((r["model"], r["shots"]) for r in table):
        rows = [r for r in table if (r["model"], r["shots"]) == key]
        datasets = rows[0]["_datasets"]
        header = ["method", *datasets, AVERAGE]
        body = [
            [
                r["method"],
                *(_pct(r[d], r[f"{d}_std"], r[f"{d}_seeds"]) for d in datasets),
                _pct(r[AVERAGE]),
            ]
            for r in rows
        ]
        parts.append(f"**{key[0]}, {key[1]} shots: top-1 (%)**\n\n" + _markdown(header, body))
    return "\n".join(parts)


def base_new_rows(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Base, new and H of each dataset and method+bits, then their average over datasets
    (H of the average base and new, as CoCoOp averages)."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in summary:
        if not _is_b2n(r):
            continue
        key = (str(r["model"]), _dataset_root(r), label(r))
        entry = found.setdefault(key, {"model": key[0], "dataset": key[1], "method": key[2]})
        entry[str(r["test_set"])] = r["top1"]
        entry[f"{r['test_set']}_std"] = r.get("top1_std")
        entry["seeds"] = r["seeds"]
    rows = [e for e in found.values() if BASE in e and NEW in e]
    for e in rows:
        e.setdefault(HM, _hm(e[BASE], e[NEW]))
    averages = []
    for model, name in dict.fromkeys((e["model"], e["method"]) for e in rows):
        members = [e for e in rows if (e["model"], e["method"]) == (model, name)]
        if len({e["dataset"] for e in members}) < 2:
            continue
        b = statistics.fmean(e[BASE] for e in members)
        n = statistics.fmean(e[NEW] for e in members)
        averages.append(
            {"model": model, "dataset": AVERAGE, "method": name, BASE: b, NEW: n, HM: _hm(b, n)}
        )
    return rows + averages


def _hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n else 0.0


def base_new_markdown(rows: Sequence[dict[str, Any]]) -> str:
    body = [
        [
            r["dataset"],
            r["model"],
            r["method"],
            _pct(r[BASE], r.get(f"{BASE}_std"), r.get("seeds", 1)),
            _pct(r[NEW], r.get(f"{NEW}_std"), r.get("seeds", 1)),
            _pct(r[HM]),
        ]
        for r in rows
    ]
    return _markdown(["dataset", "model", "method", "base", "new", "H"], body, right_from=3)


def dg_rows(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Domain generalisation: per source dataset, model and method+bits, the source accuracy,
    each target's and the targets' average."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in summary:
        if _is_b2n(r):
            continue
        groups.setdefault(
            (str(r["dataset"]), str(r["model"]), int(r["experiment_shots"] or 0)), []
        ).append(r)
    out = []
    for (dataset, model, shots), part in groups.items():
        targets = sorted({str(r["test_set"]) for r in part if not r.get("own_test_set", True)})
        if not targets:
            continue
        for name in _order({label(r) for r in part}, part):
            cells = {str(r["test_set"]): r for r in part if label(r) == name}
            source = next(
                (r for r in part if label(r) == name and r.get("own_test_set", True)), None
            )
            entry = {
                "source": dataset,
                "model": model,
                "shots": shots,
                "method": name,
                "source_top1": source["top1"] if source else None,
                "_targets": targets,
            }
            for t in targets:
                entry[t] = cells[t]["top1"] if t in cells else None
            have = [entry[t] for t in targets if entry[t] is not None]
            entry["target_average"] = statistics.fmean(have) if len(have) == len(targets) else None
            out.append(entry)
    return out


def dg_markdown(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for key in dict.fromkeys((r["source"], r["model"], r["shots"]) for r in rows):
        part = [r for r in rows if (r["source"], r["model"], r["shots"]) == key]
        targets = part[0]["_targets"]
        header = ["method", f"{key[0]} (source)", *targets, "target average"]
        body = [
            [
                r["method"],
                _pct(r["source_top1"]),
                *(_pct(r[t]) for t in targets),
                _pct(r["target_average"]),
            ]
            for r in part
        ]
        parts.append(f"**{key[1]}, {key[2]} shots: top-1 (%)**\n\n" + _markdown(header, body))
    return "\n".join(parts)


def _curves(
    summary: Sequence[dict[str, Any]],
) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Per panel (dataset, then ``average``): per method+bits, (shots, mean, std) points."""
    rows = [r for r in summary if _own(r)]
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for r in rows:
        panel = panels.setdefault(str(r["dataset"]), {})
        panel.setdefault(label(r), []).append(
            (float(r["experiment_shots"] or 0), 100 * r["top1"], 100 * float(r["top1_std"] or 0))
        )
    if len(panels) > 1:  # the average over datasets at each shot count every dataset has
        merged: dict[str, dict[float, list[float]]] = {}
        for panel in panels.values():
            for name, pts in panel.items():
                for shots, mean, _ in pts:
                    merged.setdefault(name, {}).setdefault(shots, []).append(mean)
        panels[AVERAGE] = {
            name: [
                (s, statistics.fmean(v), 0.0) for s, v in by_shots.items() if len(v) == len(panels)
            ]
            for name, by_shots in merged.items()
        }
    return panels


def has_curves(summary: Sequence[dict[str, Any]]) -> bool:
    return len({int(r["experiment_shots"] or 0) for r in summary if _own(r)}) > 1


def _bits_points(
    summary: Sequence[dict[str, Any]],
) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Per dataset (at its largest shot count): per method, (weight bits, mean, std) points."""
    rows = [r for r in summary if _own(r)]
    most = {}
    for r in rows:
        d = str(r["dataset"])
        most[d] = max(most.get(d, 0), int(r["experiment_shots"] or 0))
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for r in rows:
        d = str(r["dataset"])
        if int(r["experiment_shots"] or 0) != most[d] or r.get("w_bits") in (None, ""):
            continue
        method = f"{r['method']} [{r['setting']}]" if r.get("setting") else str(r["method"])
        panels.setdefault(d, {}).setdefault(method, []).append(
            (float(r["w_bits"]), 100 * r["top1"], 100 * float(r["top1_std"] or 0))
        )
    return panels


def has_bits(summary: Sequence[dict[str, Any]]) -> bool:
    trained = [r for r in summary if _own(r) and r["method"] not in BASELINES]
    return len({r.get("w_bits") for r in trained}) > 1


def _write_md(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


def write_reports(summary: Sequence[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Write every report the runs have the shape for into ``out``; returns name -> file."""
    from p4q_lightning.plots import accuracy_vs_bits, fewshot_curves

    written: dict[str, Path] = {}
    table = dataset_tables(summary)
    if table:
        datasets = sorted({d for r in table for d in r["_datasets"]})
        columns = ["model", "shots", "method", *datasets, AVERAGE]
        written["datasets_csv"] = write_csv(out / "datasets.csv", table, columns)
        written["datasets_md"] = _write_md(out / "datasets.md", dataset_markdown(table))
    b2n = base_new_rows(summary)
    if b2n:
        columns = ["dataset", "model", "method", BASE, NEW, HM]
        written["base_new_csv"] = write_csv(out / "base_new_hm.csv", b2n, columns)
        written["base_new_md"] = _write_md(out / "base_new_hm.md", base_new_markdown(b2n))
    dg = dg_rows(summary)
    if dg:
        targets = sorted({t for r in dg for t in r["_targets"]})
        columns = ["source", "model", "shots", "method", "source_top1", *targets, "target_average"]
        written["dg_csv"] = write_csv(out / "domain_generalisation.csv", dg, columns)
        written["dg_md"] = _write_md(out / "domain_generalisation.md", dg_markdown(dg))
    if has_curves(summary):
        written["fewshot_png"] = fewshot_curves(_curves(summary), out / "fewshot_curves.png")
    if has_bits(summary):
        written["bits_png"] = accuracy_vs_bits(_bits_points(summary), out / "accuracy_vs_bits.png")
    return written


def log_to_wandb(written: dict[str, Path], project: str, group: str | None) -> None:
    """The reports as one W&B run: markdown tables as W&B tables (from the CSVs), PNGs as images."""
    import csv

    import wandb

    run = wandb.init(project=project, job_type="compare", group=group, name="compare-report")
    try:
        payload: dict[str, Any] = {}
        for name, path in written.items():
            if path.suffix == ".png":
                payload[f"report/{name}"] = wandb.Image(str(path))
            elif path.suffix == ".csv":
                with path.open() as f:
                    rows = list(csv.reader(f))
                if rows:
                    payload[f"report/{name}"] = wandb.Table(columns=rows[0], data=rows[1:])
        run.log(payload)
    finally:
        run.finish()
