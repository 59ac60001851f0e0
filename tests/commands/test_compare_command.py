"""``p4q compare`` through the CLI entry point: runs gathered, grouped and summarised."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from p4q_lightning.cli import main as cli_main  # noqa: E402


def _fake_run(
    root: Path, name: str, bits: int, shots: int, seed: int, top1: float, dataset: str = "inet"
) -> Path:
    run = root / name / "comparison"
    run.mkdir(parents=True)
    label = f"w{bits}a{bits}"
    rows = [
        {
            "method": "fp32 zero-shot",
            "bits": "fp32",
            "w_bits": 32,
            "a_bits": 32,
            "shots": 0,
            "top1": 0.6 + seed / 100,
            "top5": 0.9,
            "size_mb": 600.0,
            "n_test": 100,
        },
        {
            "method": "ptq",
            "bits": label,
            "w_bits": bits,
            "a_bits": bits,
            "shots": 0,
            "top1": 0.3 + bits / 100,
            "top5": 0.7,
            "size_mb": 600.0 / (32 / bits),
            "n_test": 100,
        },
        {
            "method": "p4q",
            "bits": label,
            "w_bits": bits,
            "a_bits": bits,
            "shots": shots,
            "top1": top1,
            "top5": 0.95,
            "size_mb": 600.0 / (32 / bits),
            "n_test": 100,
        },
    ]
    info = {"model": "ViT-B-32", "dataset": dataset, "shots": shots, "seed": seed}
    (run / "comparison.json").write_text(json.dumps({"run": info, "rows": rows}))
    return root / name


def _sweep(root: Path) -> list[Path]:
    return [
        _fake_run(root, f"b{b}-s{s}-seed{seed}", b, s, seed, 0.5 + b / 100 + s / 100 + seed / 1000)
        for b in (4, 8)
        for s in (1, 16)
        for seed in (1, 2)
    ]


def _summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_compare_gathers_runs_into_one_table_and_plot(tmp_path, capsys) -> None:
    runs = _sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert (
        cli_main(["compare", *map(str, runs[:4]), str(tmp_path / "sweep"), "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "| dataset | model | shots | method | bits | seeds | top-1 (%) |" in text
    summary = _summary(out)
    p4q = [r for r in summary if r["method"] == "p4q"]
    assert len(p4q) == 4  # 2 bit widths x 2 shot counts, seeds averaged
    assert {int(r["seeds"]) for r in summary} == {2}  # runs named twice count once
    row = next(r for r in p4q if r["bits"] == "w8a8" and r["shots"] == "16")
    assert float(row["top1"]) == pytest.approx(0.5 + 0.08 + 0.16 + 0.0015)
    assert float(row["top1_std"]) == pytest.approx(statistics.stdev([0.001, 0.002]))
    assert "74.15 ± 0.07" in text  # mean ± std over the two seeds, in percent
    # the float zero-shot row: once per seed in each experiment, not once per run
    zero = [r for r in summary if r["method"] == "fp32 zero-shot"]
    assert [(r["experiment_shots"], r["seeds"]) for r in zero] == [("1", "2"), ("16", "2")]
    with (out / "sweep.csv").open() as f:  # 2 shots x 2 seeds x (zero-shot + 2 PTQ + 2 P4Q)
        assert len(list(csv.DictReader(f))) == 2 * 2 * 5
    assert (out / "summary.md").read_text() in text
    png = (out / "sweep.png").read_bytes()
    assert len(png) > 1000 and png[:4] == b"\x89PNG"


def test_compare_takes_globs_skips_non_runs_and_groups_by_dataset(tmp_path, capsys, caplog):
    root = tmp_path / "runs"
    _sweep(root)
    _fake_run(root, "cifar-b4-s16-seed1", 4, 16, 1, 0.7, dataset="cifar")
    (root / "config.yaml").write_text("trainer: {}\n")  # what `runs/*` also expands to
    (root / "broken" / "comparison").mkdir(parents=True)
    (root / "broken" / "comparison" / "comparison.json").write_text("{not json")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="p4q_lightning"):
        code = cli_main(["compare", str(root / "*"), str(root / "config.yaml"), "--out", str(out)])
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 2 path(s)" in warnings[0]
    assert "config.yaml" in warnings[0] and "broken" in warnings[0]
    summary = _summary(out)
    cifar = [r for r in summary if r["dataset"] == "cifar"]
    assert {r["method"] for r in cifar} == {"fp32 zero-shot", "ptq", "p4q"}
    assert all(r["seeds"] == "1" for r in cifar)  # not averaged into the ImageNet rows
    assert "9 runs" in capsys.readouterr().out
    with (out / "sweep.csv").open() as f:  # each row names its run directory, not "runs"
        named = {r["run"] for r in csv.DictReader(f)}
    assert str(root / "cifar-b4-s16-seed1") in named and str(root) not in named


def test_compare_errors(tmp_path) -> None:
    with pytest.raises(SystemExit):
        cli_main(["compare", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        cli_main(["compare", str(tmp_path)])  # exists but holds no results
