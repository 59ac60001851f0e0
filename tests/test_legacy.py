"""Old layouts are read in one module, and its list names every place that reads them."""

from __future__ import annotations

import re
from pathlib import Path

import p4q_lightning
from p4q_lightning.legacy import STILL_READ

ROOT = Path(p4q_lightning.__file__).parent


def _readers() -> set[str]:
    """Package files (relative paths) that import :mod:`p4q_lightning.legacy`."""
    pattern = re.compile(r"^\s*from p4q_lightning\.legacy import|^\s*import p4q_lightning\.legacy")
    return {
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if path.name != "legacy.py"
        and any(pattern.match(line) for line in path.read_text().splitlines())
    }


def test_every_reader_of_an_old_layout_is_on_the_list_and_every_listed_reader_reads_one():
    listed = {match for layout in STILL_READ for match in re.findall(r"[\w/]+\.py", layout.read_in)}
    assert _readers() == listed
    assert all(layout.why and layout.written_by for layout in STILL_READ)
