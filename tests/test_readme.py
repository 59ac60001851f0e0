"""The README's Python API example runs as written (it is the first thing a library user copies)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def test_deploy_example_runs_as_written(world, tmp_path, monkeypatch) -> None:
    """The "Deploy" section's onnxruntime examples run on a graph `export_onnx` wrote."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import torch
    from PIL import Image

    import tiny_world
    from p4q_lightning import P4QClassifier
    from p4q_lightning.args import PromptArgs
    from p4q_lightning.export.onnx import export_onnx

    clf = P4QClassifier.build(
        tiny_world.MODEL_NAME,
        None,
        str(world["config"]),
        quant="w8a8",
        quant_overrides=tiny_world.MINMAX,
        prompt=PromptArgs(n_ctx=2),
    )
    clf.set_classes(["cat", "dog", "bird"])
    clf.calibrate(
        [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))], progress=False
    )
    export_onnx(clf.eval(), tmp_path / "model.onnx", with_text=True)
    Image.new("RGB", (48, 40), (200, 120, 40)).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    section = README.read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "the README lost its deploy examples"
    namespace: dict = {}
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (1, 3) and namespace["classes"] == ["cat", "dog", "bird"]
    assert namespace["new_logits"].shape == (1, 2)
