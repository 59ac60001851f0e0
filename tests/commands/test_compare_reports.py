"""``p4q compare``'s paper reports: per-dataset table + average, few-shot curves, base/new/HM,
domain generalisation, accuracy vs bits (from fake run directories, through the CLI)."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from p4q_lightning.cli import main as cli_main


def _row(method: str, bits: int | None, top1: float, shots: int, test_set: str) -> dict:
    label = "fp32" if bits is None else f"w{bits}a{bits}"
    return {
        "method": method,
        "bits": label,
        "w_bits": bits or 32,
        "a_bits": bits or 32,
        "shots": shots,
        "top1": top1,
        "top5": 0.9,
        "size_mb": 1.0,
        "n_test": 100,
        "test_set": test_set,
    }


def _run(root: Path, name: str, info: dict, rows: list[dict]) -> Path:
    run = root / name / "comparison"
    run.mkdir(parents=True)
    (run / "comparison.json").write_text(json.dumps({"run": info, "rows": rows}))
    return root / name


def _acc(dataset: str, bits: int, shots: int, seed: int) -> float:
    return 0.3 + (0.1 if dataset == "pets" else 0.0) + bits / 100 + shots / 100 + seed / 1000


def _fewshot(root: Path) -> None:
    for d in ("pets", "cars"):
        for bits in (4, 8):
            for shots in (1, 16):
                for seed in (1, 2):
                    rows = [
                        _row("fp32 zero-shot", None, 0.5, 0, d),
                        _row("p4q", bits, _acc(d, bits, shots, seed), shots, d),
                    ]
                    info = {"model": "ViT-B-32", "dataset": d, "shots": shots, "seed": seed}
                    _run(root, f"{d}-{bits}-{shots}-{seed}", info, rows)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fewshot_grid_gives_coop_table_with_average_curves_and_bits(tmp_path, capsys) -> None:
    _fewshot(tmp_path / "runs")
    out = tmp_path / "out"
    assert cli_main(["compare", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = _read(out / "datasets.csv")
    row = next(r for r in table if r["method"] == "p4q w8a8" and r["shots"] == "16")
    pets = statistics.fmean(_acc("pets", 8, 16, s) for s in (1, 2))
    cars = statistics.fmean(_acc("cars", 8, 16, s) for s in (1, 2))
    assert float(row["pets"]) == pytest.approx(pets)
    assert float(row["average"]) == pytest.approx((pets + cars) / 2)
    md = (out / "datasets.md").read_text()
    assert "| method | cars | pets | average |" in md
    assert f"{100 * (pets + cars) / 2:.2f}" in md
    assert "| method | cars | pets | average |" in printed  # several datasets: printed too
    for name in ("fewshot_curves.png", "accuracy_vs_bits.png"):
        png = (out / name).read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) > 5000
    assert not (out / "base_new_hm.csv").exists()  # no base-to-novel runs: no such table
    assert not (out / "domain_generalisation.csv").exists()


def test_fewshot_curve_points_are_seed_means_with_std_and_an_average_panel() -> None:
    from p4q_lightning.reports import _curves

    summary = [
        {"dataset": d, "model": "m", "experiment_shots": s, "test_set": d, "method": "p4q",
         "setting": "", "bits": "w4a4", "top1": t, "top1_std": 0.01, "seeds": 3}
        for d, s, t in (("a", 1, 0.4), ("a", 16, 0.6), ("b", 1, 0.2), ("b", 16, 0.4))
    ]  # fmt: skip
    panels = _curves(summary)
    assert sorted(panels) == ["a", "average", "b"]
    assert sorted(panels["a"]["p4q w4a4"]) == [(1.0, 40.0, 1.0), (16.0, 60.0, 1.0)]
    assert sorted(p[:2] for p in panels["average"]["p4q w4a4"]) == [(1.0, 30.0), (16.0, 50.0)]


def test_base_new_table_has_hm_per_dataset_and_the_average(tmp_path) -> None:
    root = tmp_path / "runs"
    for d, base, new in (("pets", 0.9, 0.6), ("cars", 0.7, 0.5)):
        rows = [_row("p4q", 4, base, 16, "base"), _row("p4q", 4, new, 16, "new")]
        info = {"model": "m", "dataset": d, "shots": 16, "seed": 1, "subsample_classes": "base"}
        _run(root, d, info, rows)
    out = tmp_path / "out"
    assert cli_main(["compare", str(root), "--out", str(out)]) == 0
    table = {r["dataset"]: r for r in _read(out / "base_new_hm.csv")}
    assert float(table["pets"]["hm"]) == pytest.approx(2 * 0.9 * 0.6 / 1.5)
    b, n = (0.9 + 0.7) / 2, (0.6 + 0.5) / 2
    assert float(table["average"]["base"]) == pytest.approx(b)
    assert float(table["average"]["hm"]) == pytest.approx(2 * b * n / (b + n))
    assert "| dataset | model | method | base | new | H |" in (out / "base_new_hm.md").read_text()


def test_domain_generalisation_table_has_source_targets_and_their_average(tmp_path) -> None:
    root = tmp_path / "runs"
    rows = [
        _row("p4q", 4, 0.7, 16, "imagenet"),
        _row("p4q", 4, 0.6, 16, "imagenet-v2"),
        _row("p4q", 4, 0.4, 16, "imagenet-sketch"),
    ]
    _run(root, "dg", {"model": "m", "dataset": "imagenet", "shots": 16, "seed": 1}, rows)
    out = tmp_path / "out"
    assert cli_main(["compare", str(root), "--out", str(out)]) == 0
    (row,) = _read(out / "domain_generalisation.csv")
    assert float(row["source_top1"]) == pytest.approx(0.7)
    assert float(row["imagenet-v2"]) == pytest.approx(0.6)
    assert float(row["target_average"]) == pytest.approx(0.5)
    md = (out / "domain_generalisation.md").read_text()
    assert "| method | imagenet (source) | imagenet-sketch | imagenet-v2 | target average |" in md


@pytest.mark.slow
def test_wandb_flag_logs_the_tables_and_figures_to_one_run(tmp_path, monkeypatch) -> None:
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    _fewshot(tmp_path / "runs")
    out = tmp_path / "out"
    assert cli_main(["compare", str(tmp_path / "runs"), "--out", str(out), "--wandb"]) == 0
    (run_file,) = sorted((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    keys = set()
    for record in wandb_records.records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("history", "partial_history"):
            items = getattr(record, kind).item
            keys |= {item.key or (item.nested_key[0] if item.nested_key else "") for item in items}
    expected = {"report/datasets_csv", "report/fewshot_png", "report/bits_png"}
    assert expected <= keys
