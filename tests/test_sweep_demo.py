"""A 2 x 2 demo-world sweep from one spec file, end to end (slow: four short trainings of the
demo's model with random weights, so no teacher has to be pretrained).

Runs locally (4 run directories, one compare report), a re-run only checks (every run skipped),
and every run logged to the one W&B group of the sweep (offline run files read back)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import wandb_records
from p4q_lightning.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = yaml.safe_load((ROOT / "experiments" / "sweeps" / "demo.yaml").read_text())
    moved = ("--trainer.default_root_dir", "--model.features.cache_dir")
    command = [c for c in spec["command"] if not c.startswith(moved)]
    at = command.index("${args}")
    command[at:at] = [
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--model.features.cache_dir={root / 'store'}",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=100",
        "--model.features.views=2",
        "--data.init_args.synthetic.test_per_class=5",
        "--model.pretrained=null",  # random weights: the mechanics, not the teacher's accuracy
    ]
    spec["command"] = [str(ROOT / c) if c.endswith("demo_cpu.yaml") else c for c in command]
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return root, path


@pytest.mark.slow
def test_local_sweep_runs_skips_and_groups(sweep, capsys, monkeypatch) -> None:
    root, spec = sweep
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = root / "report"
    assert cli_main(["sweep", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": done in ") == 4 and "[4/4] " in printed and "ETA" in printed
    assert "4 runs, 4 ran, 0 skipped (finished before), 0 failed" in printed
    results = sorted(root.glob("runs/**/results.json"))
    assert len(results) == 4
    for path in results:
        payload = json.loads(path.read_text())
        assert 0.0 <= payload["test"][0]["test/top1"] <= 1.0
        assert set(payload["frozen_seconds"]) >= {"calibration", "features"}
    summary = (out / "report" / "summary.md").read_text()
    assert summary.count("| p4q |") == 2  # w4a4 and w8a8, two seeds each
    assert "| 2 |" in summary
    # every run's W&B file names the sweep's group
    groups = set()
    for run_dir in (p.parent for p in results):
        for f in wandb_records.run_files(run_dir):
            groups |= {r.run.run_group for r in wandb_records.records(f) if r.HasField("run")}
    assert groups == {"demo"}
    # a re-run only checks
    assert cli_main(["sweep", str(spec), "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped (finished)") == 4
    assert "4 runs, 0 ran, 4 skipped (finished before), 0 failed" in again
