"""benchmarks/bench_onnx.py (the README's deploy figures) still runs (tiny settings, slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_onnx.py"


@pytest.mark.slow
def test_onnx_benchmark_runs(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = ["--model", "p4q-tiny", "--classes", "4", "--batch", "4", "--eval-images", "8"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--reps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "onnxruntime, float graph" in out.stdout and "MatMulIntegerToFloat" in out.stdout
