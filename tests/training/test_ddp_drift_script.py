"""benchmarks/ddp_drift.py (the README's DDP drift figures) still runs: one demo epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ddp_drift.py"


@pytest.mark.slow
def test_ddp_drift_script_runs_and_starts_from_the_same_student() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--presets", "w4a4", "--epochs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| w4a4 | 0 |"))
    assert "| identical |" in row  # the same calibrated student on 1 and 2 processes
    assert "points" in row
