"""The README's Python API example runs as written (it is the first thing a library user copies)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_as_written() -> None:
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README lost its Python API example"
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["image_features"].shape) == (8, 512)
    assert tuple(namespace["text_features"].shape) == (2, 512)
    assert namespace["student"] is not namespace["model"]


def test_classifier_example_runs_as_written() -> None:
    """The second example (P4QClassifier without Lightning) runs after the first."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "the README lost its P4QClassifier example"
    namespace: dict = {}
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["logits"].shape) == (8, 2)
    assert not namespace["clf"].needs_calibration
