"""The ONNX export: one graph from images to class logits that onnxruntime runs with integer
weights and kernels, agreeing with the fake-quant student; the text graph with the learned
context reproduces the class matrix; metadata; clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_world
from p4q_lightning.args import PromptArgs
from p4q_lightning.export import load_lowbit
from p4q_lightning.export.from_module import export_module
from p4q_lightning.model.classifier import P4QClassifier

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from p4q_lightning.export.onnx import export_onnx  # noqa: E402
from p4q_lightning.export.onnx.writer import float_image_model, prompt_tokens  # noqa: E402

NAMES = ["red circle", "blue square", "green triangle", "yellow cross"]


def _images(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


#: (preset, extra group overrides): the two uniform presets, the official one (per-channel
#: activations) and log2-quantized attention probabilities
SPECS = {
    "w8a8": ("w8a8", {}),
    "w4a4": ("w4a4", {}),
    "p4q-official": ("p4q-official", {}),
    "w8a8-log2": ("w8a8", {"attn_internals": {"softmax_quantizer": "log2"}}),
}


@pytest.fixture(scope="module", params=list(SPECS))
def classifier(request, world) -> P4QClassifier:
    preset, extra = SPECS[request.param]
    overrides = {g: {**v, **extra.get(g, {})} for g, v in tiny_world.MINMAX.items()}
    model = P4QClassifier.build(
        tiny_world.MODEL_NAME,
        None,
        str(world["config"]),
        init_seed=0,
        quant=preset,
        quant_overrides=overrides,
        prompt=PromptArgs(n_ctx=4),
    )
    model.set_classes(NAMES)
    model.calibrate([_images(16, seed=0)], progress=False)
    with torch.no_grad():  # a trained-looking context and adapter: not their initial values
        model.prompt_learner.ctx.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        model.adapter.fc2.weight.mul_(5)
    model.invalidate_text()
    return model.eval()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _optimized_ops(path, tmp_path) -> list[str]:
    """The op types of the graph onnxruntime runs after its optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_graph_agrees_with_the_fake_quant_student_and_stores_integers(classifier, tmp_path):
    report = export_onnx(classifier, tmp_path / "model.onnx")
    images = _images()
    with torch.no_grad():
        want = classifier.student_logits(images)
    got = torch.from_numpy(_session(report.path).run(["logits"], {"images": images.numpy()})[0])
    assert got.shape == want.shape == (32, len(NAMES))
    assert bool(got.argmax(1).eq(want.argmax(1)).all())
    assert float(F.cosine_similarity(got, want, dim=-1).min()) > 0.9999
    model = onnx.load(str(report.path))
    weights = [
        t
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)
    ]
    spec = classifier.quant_spec
    n_linear = 1 + 2 * 4 + 2  # patch embedding, 2 blocks x (in, out, fc, proj), adapter fc1/fc2
    assert len(weights) == n_linear
    four_bit = spec["vision.mlp_fc"].w_bits == 4
    assert {t.data_type for t in weights if "mlp" in t.name} == {
        onnx.TensorProto.INT4 if four_bit else onnx.TensorProto.INT8
    }
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == NAMES
    pre = json.loads(meta["preprocessing"])
    assert pre["size"] == [32, 32] and len(pre["mean"]) == len(pre["std"]) == 3
    assert json.loads(meta["quant_spec"])["name"] == spec.name
    if spec.name.startswith("p4q-official"):
        assert report.per_channel_activations > 0 and "per channel" in report.notes[0]
    else:  # every GEMM of the image tower became an integer kernel in onnxruntime
        ops = _optimized_ops(report.path, tmp_path)
        integer = ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul")
        # the patch embedding and 2 blocks x (in_proj, out_proj, c_fc, c_proj) at least
        assert integer >= 1 + 2 * 4 and "MatMulNBits" not in ops


def test_batch_size_is_dynamic(classifier, tmp_path):
    report = export_onnx(classifier, tmp_path / "model.onnx")
    session = _session(report.path)
    for n in (1, 5):
        logits, feats = session.run(None, {"images": _images(n).numpy()})
        assert logits.shape == (n, len(NAMES)) and feats.shape[0] == n
        np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)


def test_the_lowbit_file_exports_the_same_graph(classifier, tmp_path):
    """From a low-bit safetensors export (load_lowbit), the graph gives the same logits."""
    lowbit = export_module(classifier, tmp_path / "model.safetensors").path
    from_file = export_onnx(lowbit, tmp_path / "from_file.onnx")
    direct = export_onnx(classifier, tmp_path / "direct.onnx")
    images = _images(8).numpy()
    a = torch.from_numpy(_session(from_file.path).run(["logits"], {"images": images})[0])
    b = torch.from_numpy(_session(direct.path).run(["logits"], {"images": images})[0])
    assert bool(a.argmax(1).eq(b.argmax(1)).all())
    # the file's weights are the same codes; float rounding may flip an activation code
    assert float(F.cosine_similarity(a, b, dim=-1).min()) > 0.9999
    with pytest.raises(ValueError, match="without int8=True"):
        export_onnx(load_lowbit(lowbit, int8=True), tmp_path / "int8.onnx")


def test_text_graph_reproduces_the_class_matrix_and_takes_new_names(classifier, tmp_path):
    report = export_onnx(classifier, tmp_path / "model.onnx", with_text=True)
    assert report.text_path == tmp_path / "model-text.onnx" and report.text_min_cosine > 0.9999
    session = _session(report.text_path)
    from p4q_lightning.export.onnx.source import from_classifier

    source = from_classifier(classifier)
    (emb,) = session.run(["class_embeddings"], {"token_ids": prompt_tokens(source, NAMES)})
    want = classifier.student_text_features().detach()
    torch.testing.assert_close(torch.from_numpy(emb), want, rtol=0, atol=2e-3)
    # a class it was not trained on: the embedding the student would compute for it
    classifier.set_classes(["purple star"])
    try:
        new_want = classifier.student_text_features().detach()
    finally:
        classifier.set_classes(NAMES)
    (new,) = session.run(
        ["class_embeddings"], {"token_ids": prompt_tokens(source, ["purple star"])}
    )
    assert float(F.cosine_similarity(torch.from_numpy(new), new_want, dim=-1)) > 0.9999


def test_float_graph_is_the_open_clip_model(world):
    """The float graph (the benchmark's reference) computes open_clip's own encode_image."""
    from p4q_lightning import load_clip

    torch.manual_seed(0)
    model, _, _ = load_clip(tiny_world.MODEL_NAME, None)
    text = torch.randn(5, model.text_projection.shape[1])
    session = ort.InferenceSession(
        float_image_model(model, None, text, 50.0).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    images = _images(4)
    logits, feats = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = F.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(logits), 50.0 * want @ F.normalize(text, dim=-1).t(), rtol=1e-4, atol=1e-4
    )


def test_text_graph_is_refused_for_class_specific_context(world, tmp_path):
    model = P4QClassifier.build(
        tiny_world.MODEL_NAME,
        None,
        str(world["config"]),
        init_seed=0,
        quant="w8a8",
        quant_overrides=tiny_world.MINMAX,
        prompt=PromptArgs(n_ctx=2, class_specific=True),
    )
    model.set_classes(NAMES)
    model.calibrate([_images(8)], progress=False)
    with pytest.raises(ValueError, match="class-specific"):
        export_onnx(model.eval(), tmp_path / "m.onnx", with_text=True)
    assert not (tmp_path / "m.onnx").exists()  # nothing half-written


def test_cli_without_the_extra_says_how_to_install(tmp_path, monkeypatch, capsys):
    """With onnx and onnxruntime not found, `p4q export --format onnx` fails in one line that
    names the install command, before reading the checkpoint."""
    import importlib.util

    from p4q_lightning.cli import main as cli_main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("onnx", "onnxruntime") else real(name, *a),
    )
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"not read")
    assert cli_main(["export", str(ckpt), "--format", "onnx"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pip install 'p4q_lightning[onnx]'" in lines[0]
