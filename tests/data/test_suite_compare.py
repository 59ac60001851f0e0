"""``p4q compare`` over runs with several test sets: a row per test set, CoCoOp's H recomputed
from the mean base and mean new accuracy (not the mean of each run's H)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p4q_lightning.callbacks.compare import harmonic_mean_rows
from p4q_lightning.cli import main as cli_main


def row(test_set: str, method: str, top1: float) -> dict:
    bits = "fp32" if method != "p4q" else "w4a4"
    return {
        "test_set": test_set,
        "method": method,
        "bits": bits,
        "w_bits": 32 if bits == "fp32" else 4,
        "a_bits": 32 if bits == "fp32" else 4,
        "shots": 16 if method == "p4q" else 0,
        "top1": top1,
        "top5": 1.0,
        "size_mb": 1.0,
        "n_test": 10,
    }


def fake_run(root: Path, seed: int, base: float, new: float) -> None:
    rows = [row("base", m, base) for m in ("fp32 zero-shot", "p4q")]
    rows += [row("new", m, new) for m in ("fp32 zero-shot", "p4q")]
    rows += harmonic_mean_rows(rows)
    info = {"model": "ViT-B-16", "dataset": "dtd", "shots": 16, "seed": seed}
    out = root / f"seed{seed}" / "comparison"
    out.mkdir(parents=True)
    (out / "comparison.json").write_text(json.dumps({"run": info, "rows": rows}))


def test_each_run_reports_the_harmonic_mean_of_base_and_new():
    rows = [row("base", "p4q", 0.8), row("new", "p4q", 0.6), row("base", "ptq", 0.5)]
    (hm,) = harmonic_mean_rows(rows)  # ptq has no new row: no H
    assert hm["test_set"] == "hm" and hm["method"] == "p4q"
    assert hm["top1"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)


def test_compare_groups_by_test_set_and_recomputes_h_over_seeds(tmp_path, capsys):
    fake_run(tmp_path / "runs", 1, base=0.9, new=0.3)
    fake_run(tmp_path / "runs", 2, base=0.7, new=0.5)
    assert cli_main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "summary.csv").open() as f:
        summary = {(r["test_set"], r["method"]): r for r in csv.DictReader(f)}
    assert set(summary) == {
        (s, m) for s in ("base", "new", "hm") for m in ("fp32 zero-shot", "p4q")
    }
    base, new = float(summary[("base", "p4q")]["top1"]), float(summary[("new", "p4q")]["top1"])
    assert (base, new) == pytest.approx((0.8, 0.4))
    # H of the means (0.5333), not the mean of the runs' H (0.45 and 0.5833 -> 0.5167)
    assert float(summary[("hm", "p4q")]["top1"]) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    table = capsys.readouterr().out
    assert "| dataset | test set | model |" in table and "| dtd | hm | ViT-B-16 |" in table
