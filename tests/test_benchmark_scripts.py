"""The benchmark scripts behind the README's figures still run (tiny settings, slow marker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> str:
    """Run ``benchmarks/<script>`` in a fresh process (this test run's import path, W&B
    offline); fails the test with its stderr when it exits non-zero; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), WANDB_MODE="offline")
    cmd = [sys.executable, str(BENCHMARKS / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_step_benchmark_runs() -> None:
    out = run_benchmark(
        "bench_train_step.py", "--classes", "4", "--batch", "2", "--steps", "1",
        "--model", "ViT-B-32",
    )  # fmt: skip
    assert "cached step (s)" in out and "checkpoint (MB)" in out


@pytest.mark.slow
def test_gpu_check_runs_in_its_cpu_mode(tmp_path) -> None:
    """``gpu_check.py --device cpu --tiny`` runs every part of the GPU check and prints one JSON
    with sane values, so the script is ready whenever a GPU is."""
    import json

    out = run_benchmark(
        "gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path / "check.json"),
        timeout=900,
    )
    report = json.loads(out)
    assert report == json.loads((tmp_path / "check.json").read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    configs = {(s["classes"], s["precision"], s["checkpointing"]) for s in report["steps"]}
    assert configs == {
        (n, p, ck)
        for n in (4, 12)
        for p in ("32-true", "bf16-mixed")
        for ck in ((False, True) if n == 12 else (False,))
    }
    for step in report["steps"]:
        assert 0 < step["step_s_min"] <= step["step_s"] <= step["step_s_max"] < 60, step
        assert 0 < step["peak_mb_steps"] and 0 < step["peak_mb_before_steps"]
    speeds = report["image_tower"]["images_per_s"]
    assert set(speeds) == {
        "float32",
        "fake-quant w4a4",
        "fake-quant w8a8",
        "int8 w8a8 (torch._int_mm)",
    }
    assert all(v > 0 for v in speeds.values())
    assert report["image_tower"]["int8_vs_fake_quant_min_cosine"] > 0.99
    assert len(report["int8_matmul"]) == 4
    assert all(row["int32_exact"] for row in report["int8_matmul"])
    tests = report["gpu_tests"]
    assert "tests/test_gpu.py" in tests["files"] and tests["passed"], tests
    assert "skipped" in tests["summary"]  # no CUDA here: every gpu test skips, none fails


@pytest.mark.slow
def test_class_scaling_benchmark_runs() -> None:
    """``bench_class_scaling.py`` (the README's scaling table) on p4q-tiny: a row per class
    count, each step measured, and the weight accounting."""
    out = run_benchmark(
        "bench_class_scaling.py",
        *("--model", "p4q-tiny", "--classes", "4", "8", "--chunked"),
        *("--steps", "1", "--warmup", "1"),
    )
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| 4 ", "| 8 "))]
    assert len(rows) == 2
    assert all(float(row[2]) > 0 for row in rows)  # step seconds
    assert "| p4q-tiny |" in out and "| ViT-L-14 |" in out


@pytest.mark.slow
def test_text_checkpointing_benchmark_runs() -> None:
    """``bench_text_checkpointing.py`` (the README's checkpointing comparison) on p4q-tiny: a
    row per strategy, unchunked first."""
    out = run_benchmark(
        "bench_text_checkpointing.py",
        *("--model", "p4q-tiny", "--classes", "6", "--chunk", "2", "--reps", "1"),
    )
    rows = [line.split("|") for line in out.splitlines()[2:] if line.startswith("| ")]
    assert [row[1].strip() for row in rows] == [
        "unchunked",
        "chunked",
        "per-block MLP",
        "chunk, selective",
        "chunk, all matmuls",
        "chunk, whole",
        "unchunked, int8 codes",
        "per-block MLP, int8 codes",
    ]
    assert rows[0][5].strip() == "1.00x" and all(float(row[4]) > 0 for row in rows)
