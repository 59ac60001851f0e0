"""The benchmark scripts behind the README's figures still run (tiny settings, slow marker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_train_step_benchmark_runs() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_train_step.py"),
            "--classes",
            "4",
            "--batch",
            "2",
            "--steps",
            "1",
            "--model",
            "ViT-B-32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached step (s)" in out.stdout and "checkpoint (MB)" in out.stdout
