"""``p4q compare`` never merges distinct runs silently: trained runs that differ in a setting
(a learning rate) stay apart with the setting shown, true duplicates are reported, only the
baselines are deduplicated; the dataset is spelt as in the run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from p4q_lightning import rundir
from p4q_lightning.callbacks.compare import FP_METHOD, PTQ_METHOD
from p4q_lightning.cli import main as cli_main
from p4q_lightning.commands.compare import BASELINES
from p4q_lightning.data.sources import SyntheticArgs


def config(lr: float = 0.002, seed: int = 1, dataset: str = "uoft-cs/cifar100", **data) -> dict:
    return {
        "seed_everything": seed,
        "trainer": {"max_epochs": 10, "devices": 1, "default_root_dir": "runs"},
        "model": {
            "model_name": "ViT-B-32",
            "method": "p4q",
            "quant": "w4a4",
            "optim": {"prompt_lr": lr, "adapter_lr": 0.001},
        },
        "data": {
            "class_path": "p4q_lightning.data.FewShotDataModule",
            "init_args": {"dataset": dataset, "shots": 16, "seed": seed, "num_workers": 4, **data},
        },
    }


def write_run(
    directory: Path, top1: float, seed: int = 1, cfg: dict | None = None, dataset: str = "c100"
) -> Path:
    """A finished run: its saved fit config and the comparison a `test` wrote."""
    (directory / "comparison").mkdir(parents=True)
    if cfg is not None:
        (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = {"w_bits": 4, "a_bits": 4, "top5": 0.9, "size_mb": 100.0, "n_test": 100}
    rows = [
        {**row, "method": "fp32 zero-shot", "bits": "fp32", "shots": 0, "top1": 0.60},
        {**row, "method": "ptq", "bits": "w4a4", "shots": 0, "top1": 0.30},
        {**row, "method": "p4q", "bits": "w4a4", "shots": 16, "top1": top1},
    ]
    run = {"model": "ViT-B-32", "dataset": dataset, "shots": 16, "seed": seed}
    (directory / "comparison" / "comparison.json").write_text(
        json.dumps({"run": run, "rows": rows})
    )
    return directory


def summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_baselines_are_the_comparison_callbacks_rows():
    assert set(BASELINES) == {FP_METHOD, PTQ_METHOD}


@pytest.mark.parametrize("order", [1, -1])
def test_runs_that_differ_in_a_setting_stay_apart(tmp_path, capsys, order):
    slow = write_run(tmp_path / "lr-small", 0.0156, cfg=config(lr=0.002))
    fast = write_run(tmp_path / "lr-large", 0.50, cfg=config(lr=0.01))
    out = tmp_path / "out"
    assert cli_main(["compare", *map(str, [slow, fast][::order]), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    p4q = {r["setting"]: r for r in summary(out) if r["method"] == "p4q"}
    assert set(p4q) == {"optim.prompt_lr=0.002", "optim.prompt_lr=0.01"}
    assert float(p4q["optim.prompt_lr=0.002"]["top1"]) == pytest.approx(0.0156)
    assert float(p4q["optim.prompt_lr=0.01"]["top1"]) == pytest.approx(0.50)
    assert all(r["seeds"] == "1" for r in p4q.values())
    assert "p4q [optim.prompt_lr=0.01] | w4a4 | 1 | 50.00" in table
    assert "p4q [optim.prompt_lr=0.002] | w4a4 | 1 | 1.56" in table
    # the baselines both runs report (same data, model, bits and seed) count once
    zero = [r for r in summary(out) if r["method"] == "fp32 zero-shot"]
    assert len(zero) == 1 and zero[0]["seeds"] == "1" and zero[0]["setting"] == ""


def test_seeds_of_one_setting_average_and_another_setting_is_its_own_group(tmp_path):
    runs = [
        write_run(tmp_path / f"a-seed{s}", 0.5 + s / 100, seed=s, cfg=config(seed=s))
        for s in (1, 2, 3)
    ]
    runs.append(write_run(tmp_path / "b-seed1", 0.9, seed=1, cfg=config(seed=1, calib_images=64)))
    out = tmp_path / "out"
    assert cli_main(["compare", *map(str, runs), "--out", str(out)]) == 0
    p4q = {r["setting"]: r for r in summary(out) if r["method"] == "p4q"}
    assert set(p4q) == {"calib_images=unset", "calib_images=64"}
    assert p4q["calib_images=unset"]["seeds"] == "3"
    assert float(p4q["calib_images=unset"]["top1"]) == pytest.approx(0.52)
    assert p4q["calib_images=64"]["seeds"] == "1"


def test_true_duplicates_are_counted_once_with_a_warning(tmp_path, caplog):
    first = write_run(tmp_path / "first", 0.40, cfg=config())
    again = write_run(tmp_path / "again", 0.42, cfg=config(num_workers=0))  # not a setting
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="p4q_lightning"):
        assert cli_main(["compare", str(first), str(again), "--out", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "repeat another run's settings and seed" in warnings[0]
    assert f"{again} (same as {first})" in warnings[0]
    p4q = [r for r in summary(out) if r["method"] == "p4q"]
    assert len(p4q) == 1 and float(p4q[0]["top1"]) == pytest.approx(0.40)


def test_runs_without_a_saved_config_are_not_merged(tmp_path):
    a = write_run(tmp_path / "a", 0.40)
    b = write_run(tmp_path / "b", 0.60)
    out = tmp_path / "out"
    assert cli_main(["compare", str(a), str(b), "--out", str(out)]) == 0
    p4q = sorted((r["setting"], r["top1"]) for r in summary(out) if r["method"] == "p4q")
    assert [(s, float(t)) for s, t in p4q] == [(f"run={a}", 0.40), (f"run={b}", 0.60)]


@pytest.mark.parametrize(
    ("spelling", "data"),
    [("synthetic:0", {}), ("synthetic", {"synthetic": {"world_seed": 0}}), ("synthetic", {})],
)
def test_one_spelling_of_the_synthetic_world_everywhere(tmp_path, spelling, data):
    assert SyntheticArgs().world_seed == 0  # the world of a bare "synthetic"
    cfg = config(dataset=spelling, **data)
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    directory = rundir.run_directory(cfg)
    ident = rundir.identity(cfg)
    # ComparisonCallback records the datamodule's own spelling
    write_run(directory, 0.5, cfg=cfg, dataset=spelling)
    out = tmp_path / "out"
    assert cli_main(["compare", str(tmp_path / "runs"), "--out", str(out)]) == 0
    names = {r["dataset"] for r in summary(out)}
    assert names == {"synthetic-0"}
    assert directory.relative_to(tmp_path / "runs").parts[0] == "synthetic-0"
    assert ident.wandb_group.startswith("synthetic-0-") and "synthetic-0" in ident.wandb_tags
    table = (out / "summary.md").read_text()
    assert "| synthetic-0 | ViT-B-32 |" in table and "test set" not in table  # one spelling


def test_a_dataset_without_a_saved_config_is_named_as_its_run_directory(tmp_path):
    run = write_run(tmp_path / "r", 0.5, dataset="ILSVRC/imagenet-1k")
    out = tmp_path / "out"
    assert cli_main(["compare", str(run), "--out", str(out)]) == 0
    assert {r["dataset"] for r in summary(out)} == {"imagenet-1k"}
