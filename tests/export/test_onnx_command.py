"""``p4q export CKPT --format onnx`` through the CLI entry point, the path users take: a fitted
checkpoint (and the low-bit file of it) becomes a graph that onnxruntime runs with the
module's logits."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_world
from p4q_lightning.cli import main as cli_main
from p4q_lightning.module import P4QModule

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def test_export_command_writes_onnx_from_checkpoint_and_lowbit_file(world, tmp_path, capsys):
    module = P4QModule(
        **tiny_world.module_args(
            world, quant="w4a4", quant_overrides=tiny_world.MINMAX, features={"views": 1}
        )
    )
    dm = tiny_world.TinyDataModule(str(world["data"]))
    trainer = tiny_world.trainer(
        tmp_path, num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=2
    )
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "p4q.ckpt"
    trainer.save_checkpoint(ckpt)

    assert cli_main(["export", str(ckpt), "--format", "onnx", "--with-text", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert (
        "INT4" in printed and "verified: onnxruntime top-1 equals the student's on 16/16" in printed
    )
    graph, text = tmp_path / "p4q.onnx", tmp_path / "p4q-text.onnx"
    assert graph.is_file() and text.is_file()

    images = torch.stack([dm.val_dataset[i][0] for i in range(8)])
    module.eval()
    with torch.no_grad():
        want = module.classifier.student_logits(images)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()) > 0.9999
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == dm.classnames
    assert json.loads(meta["quant_spec"])["name"].startswith("w4a4")

    # from the low-bit file of the same checkpoint
    assert cli_main(["export", str(ckpt)]) == 0
    lowbit = tmp_path / "p4q-lowbit.safetensors"
    assert (
        cli_main(["export", str(lowbit), "--format", "onnx", "--out", str(tmp_path / "f.onnx")])
        == 0
    )
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    from_file = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    assert torch.equal(from_file.argmax(1), want.argmax(1))

    with pytest.raises(SystemExit):  # --with-text belongs to the ONNX format
        cli_main(["export", str(ckpt), "--with-text"])
