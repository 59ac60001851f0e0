"""The scripts behind the README's baseline cost and CLIP-LoRA deployment figures still run:
``benchmarks/baseline_costs.py`` and ``benchmarks/lora_merge.py`` on the demo baselines config
with the tiny model and data swapped in (slow marker)."""

from __future__ import annotations

import re

import pytest
import yaml

from test_baselines import demo_config
from test_benchmark_scripts import run_benchmark


@pytest.mark.slow
def test_baseline_costs_times_every_method_against_p4q(world, tmp_path) -> None:
    config = demo_config(world, tmp_path, "p4q")
    out = run_benchmark(
        "baseline_costs.py", "--config", str(config), "--root", str(tmp_path / "costs"),
        "--rounds", "1", "--classes", "3", "--batch", "2", "--steps", "1",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    ratios = dict(re.findall(r"^\| (\w+) \| [\d.]+ \| ([\d.]+)x \|$", out, re.MULTILINE))
    assert set(ratios) == {"p4q", "kgcoop", "tip_adapter", "tip_adapter_f", "clip_lora"}, out
    assert float(ratios["p4q"]) == 1.0
    step_ratio = re.search(r"^\| CLIP-LoRA / P4Q \| ([\d.]+)x \|$", out, re.MULTILINE)
    assert step_ratio is not None and float(step_ratio.group(1)) > 0, out


@pytest.mark.slow
def test_lora_merge_scores_the_side_branch_and_the_merged_requantized_model(
    world, tmp_path
) -> None:
    config = demo_config(world, tmp_path, "clip_lora")
    # the real few-shot datamodule, as the shipped config has: it gives a test loader only
    # after setup("test"), which the script must call after fit
    cfg = yaml.safe_load(config.read_text())
    cfg["data"] = {
        "class_path": "p4q_lightning.data.FewShotDataModule",
        "init_args": {
            "dataset": str(world["data"]), "shots": 2, "num_workers": 0, "image_size": 32,
            "split_dir": str(tmp_path / "splits"),
        },
    }  # fmt: skip
    config.write_text(yaml.safe_dump(cfg))
    out = run_benchmark(
        "lora_merge.py", "--config", str(config), "--quants", "w4a4",
        "--root", str(tmp_path / "merge"), cwd=tmp_path, timeout=900,
    )  # fmt: skip
    row = re.search(r"^\| w4a4 \| (.+) \|$", out, re.MULTILINE)
    assert row is not None, out
    before, side, merged, side_mb, merged_mb = (float(v) for v in row.group(1).split(" | "))
    assert all(0.0 <= acc <= 100.0 for acc in (before, side, merged))
    # the side branch is the PTQ student plus float factors; the merged model a plain student
    assert side_mb > merged_mb > 0
