"""The fake-quant benchmark script runs end to end and prints the README's table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fakequant.py"


@pytest.mark.slow
def test_benchmark_prints_a_ratio_table() -> None:
    args = [
        "--model",
        "ViT-S-32",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
    ]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | throughput vs float")
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == ["float", "w8a8", "w4a4"]
    assert rows[1].split("|")[2].strip() == "1.00x"
    for row in rows[2:]:
        ratio = float(row.split("|")[2].strip().rstrip("x"))
        cosine = float(row.split("|")[3])
        assert ratio > 0 and 0.5 < cosine <= 1.0
