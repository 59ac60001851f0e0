"""The one CSV writer: header, rows, left-out keys, and nothing half-written on failure."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

import pytest

from p4q_lightning.files import default_file_mode, write_csv


def test_writes_header_and_rows_and_leaves_out_other_keys(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"a": 1, "b": "x", "extra": 9}], ["a", "b"])
    assert list(csv.DictReader(path.open())) == [{"a": "1", "b": "x"}]
    assert os.stat(path).st_mode & 0o777 == default_file_mode()


def test_a_failure_midway_keeps_the_previous_file(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"a": 1}], ["a"])
    before = path.read_bytes()

    def rows() -> Iterator[dict[str, int]]:
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_csv(path, rows(), ["a"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary left behind
