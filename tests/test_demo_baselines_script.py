"""benchmarks/demo_baselines.py: the sweep file's grid, expanded as W&B would, one run per
distinct model, and the table it prints from the runs' comparison files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweeps" / "demo_baselines.yaml"


def script():
    spec = importlib.util.spec_from_file_location(
        "demo_baselines", ROOT / "benchmarks" / "demo_baselines.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_baselines"] = module
    spec.loader.exec_module(module)
    return module


def test_the_sweep_is_a_wandb_grid_over_method_quant_and_seed_on_the_demo_config():
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid"
    params = sweep["parameters"]
    assert set(params) == {"model.method", "model.quant", "seed_everything"}
    assert {"p4q", "tip_adapter", "tip_adapter_f", "clip_lora", "kgcoop"} <= set(
        params["model.method"]["values"]
    )
    assert params["model.quant"]["values"] == ["fp", "w8a8", "w4a4"]
    assert params["seed_everything"]["values"] == [0, 1, 2]
    command = sweep["command"]
    assert command[0] == "${env}" and command[-1] == "${args}"
    assert (ROOT / command[command.index("--config") + 1]).is_file()


def test_grid_runs_each_distinct_model_once_seed_major():
    demo = script()
    (config,), points = demo.grid(yaml.safe_load(SWEEP.read_text()))
    assert config == "experiments/demo_baselines.yaml"
    methods = yaml.safe_load(SWEEP.read_text())["parameters"]["model.method"]["values"]
    assert len(points) == len(methods) * 3 * 3
    keys = [demo.run_key(p) for p in points]
    assert [k[2] for k in keys] == sorted(k[2] for k in keys)  # seeds outermost
    # coop is the float model at every model.quant: one run per seed
    assert {k for k in keys if k[0] == "coop"} == {("coop", "fp32", s) for s in (0, 1, 2)}
    assert ("clip_lora", "w4a4", 1) in keys and ("tip_adapter", "fp32", 2) in keys
    assert len(set(keys)) == len(points) - 2 * 3 * ("coop" in methods)


def test_table_is_mean_and_std_over_seeds(tmp_path):
    demo = script()
    results = [
        {"method": "p4q", "bits": "w4a4", "seed": s, "top1": v}
        for s, v in enumerate((0.60, 0.62, 0.64))
    ] + [{"method": "ptq", "bits": "w4a4", "seed": 0, "top1": 0.5}]
    text = demo.table(results, ["fp32", "w8a8", "w4a4"])
    assert "| p4q |  |  | 62.0 ± 2.0 (3) |" in text
    assert "| ptq |  |  | 50.0 (1) |" in text
    assert text.index("| ptq") < text.index("| p4q")
