"""Build, check and write the ONNX graphs of a trained P4Q classifier."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from p4q_lightning.export.format import ExportMismatchError, check_writable
from p4q_lightning.export.onnx.graph import OPSET, GraphBuilder
from p4q_lightning.export.onnx.layers import LayerWriter
from p4q_lightning.export.onnx.source import ExportSource, export_source
from p4q_lightning.export.onnx.towers import (
    CLASS_EMBEDDINGS,
    TOKENS,
    image_size,
    text_root,
    write_image_graph,
    write_text_graph,
)
from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

#: protobuf's limit: larger models keep their initializers in a side file
PROTOBUF_LIMIT = 2**31 - 2**24
#: the text graph must reproduce the class matrix for the training classes at least this well
TEXT_MIN_COSINE = 0.999


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote, and how its weights are stored."""

    path: Path
    file_bytes: int
    int8_weights: int
    int4_weights: int
    float_weights: int
    per_channel_activations: int
    text_path: Path | None = None
    text_bytes: int | None = None
    #: the text graph's class embeddings vs the class matrix, training classes (min cosine)
    text_min_cosine: float | None = None
    notes: list[str] = field(default_factory=list)


def preprocessing_of(
    source: ExportSource, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Size, mean, std and interpolation the images must be preprocessed with."""
    from p4q_lightning.data.transforms import model_preprocess

    pre = model_preprocess(source.model_name, source.pretrained)
    for key in ("mean", "std", "interpolation"):
        if overrides and overrides.get(key):
            pre[key] = overrides[key]
    height, width = image_size(source.clip.visual)
    return {
        "size": [height, width],
        "resize": "shorter side to the size, then centre crop",
        "interpolation": str(pre["interpolation"]),
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
        "input": "RGB, float32 [N, 3, H, W], (pixel / 255 - mean) / std",
    }


def _bits_of(spec_groups: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: {"w_bits": g.w_bits, "a_bits": g.a_bits, "a_per_channel": g.a_per_channel}
        for name, g in spec_groups.items()
    }


def integer_weights(initializers: Sequence[onnx.TensorProto]) -> tuple[int, int]:
    """(INT8, INT4) weight initializers among ``initializers``."""
    types = [t.data_type for t in initializers]
    return types.count(onnx.TensorProto.INT8), types.count(onnx.TensorProto.INT4)


def per_channel_note(count: int, spec_name: str) -> str:
    return (
        f"{count} activation quantizer(s) of {spec_name} are per channel: exported exactly as "
        "their fake-quant arithmetic (Mul, Round, Max, Min, Mul), but no integer GEMM takes "
        "per-channel input scales, so onnxruntime runs those layers in float"
    )


def build_image_model(
    source: ExportSource, preprocessing: Mapping[str, Any] | None = None, quantized: bool = True
) -> tuple[onnx.ModelProto, LayerWriter]:
    """images [N, 3, H, W] -> ``logits`` [N, C] and ``image_features`` [N, D] (normalised)."""
    graph = GraphBuilder()
    writer = LayerWriter(graph, quantized=quantized)
    inputs, outputs = write_image_graph(
        writer, source.clip.visual, source.adapter, source.text_features, source.logit_scale
    )
    int8, int4 = integer_weights(graph.initializers)
    spec = source.spec
    notes = []
    if writer.counts["per_channel_activations"]:
        notes.append(per_channel_note(writer.counts["per_channel_activations"], spec.name))
    metadata = {
        "classes": json.dumps(source.classnames),
        "preprocessing": json.dumps(preprocessing or preprocessing_of(source)),
        "quant_spec": json.dumps(spec.to_dict() if quantized else {"name": "fp"}),
        "quant_bits": json.dumps(_bits_of(spec.groups) if quantized else {}),
        "weights": json.dumps(
            {
                "int8": int8,
                "int4": int4,
                "float": writer.counts["float_weights"],
                "storage": "signed per-output-channel codes (INT4 for <= 4 bits, else INT8) "
                "-> DequantizeLinear; activations QuantizeLinear/DequantizeLinear uint8",
            }
        ),
        "logit_scale": repr(float(source.logit_scale)),
        "model": json.dumps(
            {"name": source.model_name, "pretrained": source.pretrained, "method": source.method}
        ),
        "outputs": "logits [N, C] = logit_scale * image_features @ normalize(class matrix)^T; "
        "image_features [N, D] normalised",
        "notes": json.dumps(notes),
    }
    bits = spec.name if quantized else "float"
    doc = f"P4Q {source.method} {bits} classifier of {source.model_name}"
    return graph.model("p4q_image_classifier", inputs, outputs, metadata, doc), writer


def text_input_of(source: ExportSource) -> dict[str, Any]:
    root = text_root(source.clip)
    return {
        "tokenizer": f"open_clip.get_tokenizer({source.model_name!r})",
        "text": "{name}.",
        "example": "tokenizer([f'{name}.' for name in names])",
        "context_length": int(root.positional_embedding.shape[0]),
        "n_ctx": int(source.prompt_ctx.shape[0]) if source.prompt_ctx is not None else 0,
    }


def build_text_model(source: ExportSource, quantized: bool = True) -> onnx.ModelProto:
    """token ids of ``"<name>."`` [M, L] -> ``class_embeddings`` [M, D] (normalised)."""
    if source.text_refusal is not None or source.prompt_ctx is None:
        raise ExportMismatchError(
            f"--with-text needs one learned context shared by all classes with the class name "
            f"at the end of the prompt, but {source.text_refusal}"
        )
    graph = GraphBuilder()
    writer = LayerWriter(graph, quantized=quantized)
    clip = source.clip
    pool = getattr(clip, "text_pool_type", getattr(text_root(clip), "pool_type", "argmax"))
    eos = getattr(clip, "text_eos_id", getattr(text_root(clip), "eos_id", None))
    inputs, outputs = write_text_graph(writer, clip, source.prompt_ctx, pool, eos)
    metadata = {
        "classes": json.dumps(source.classnames),
        "text_input": json.dumps(text_input_of(source)),
        "quant_spec": json.dumps(source.spec.to_dict()),
        "logit_scale": repr(float(source.logit_scale)),
        "model": json.dumps(
            {"name": source.model_name, "pretrained": source.pretrained, "method": source.method}
        ),
        "outputs": "class_embeddings [M, D] normalised; logits = logit_scale * "
        "image_features @ class_embeddings^T",
    }
    doc = f"P4Q text tower with the learned context of {source.model_name}"
    return graph.model("p4q_text_encoder", inputs, outputs, metadata, doc)


def prompt_tokens(source: ExportSource, names: Sequence[str]) -> np.ndarray:
    """Token ids the text graph takes for ``names`` (as the prompt learner cleans them)."""
    if source.tokenizer is None:
        raise ExportMismatchError("the model has no tokenizer to check the text graph with")
    cleaned = [str(n).replace("_", " ").strip() + "." for n in names]
    return source.tokenizer(cleaned).numpy().astype(np.int64)


def text_agreement(source: ExportSource, model: onnx.ModelProto) -> float:
    """Min cosine between the text graph's embeddings of the training classes (onnxruntime)
    and the class matrix the image graph holds."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = prompt_tokens(source, source.classnames)
    (emb,) = session.run([CLASS_EMBEDDINGS], {TOKENS: ids})
    ref = torch.nn.functional.normalize(source.text_features.float(), dim=-1)
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(emb), ref, dim=-1).min())


def save_model(model: onnx.ModelProto, path: Path) -> int:
    """Write atomically; a model past protobuf's 2 GB limit keeps its weights in ``<path>.data``."""
    external = model.ByteSize() > PROTOBUF_LIMIT
    with atomic_write(path) as tmp:
        if external:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                location=path.name + ".data",
                all_tensors_to_one_file=True,
            )
        else:
            onnx.save_model(model, str(tmp))
    return os.path.getsize(path)


def export_onnx(
    model: Any,
    path: str | os.PathLike[str],
    with_text: bool = False,
    text_path: str | os.PathLike[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> OnnxExportReport:
    """Write a trained P4Q classifier as an ONNX graph from images to class logits.

    ``model`` is a ``P4QClassifier``, a ``LowBitCLIP`` (``load_lowbit(path)``) or a low-bit
    file's path. ``with_text`` also writes the text tower with the learned context
    (``text_path``, default ``<path stem>-text.onnx``), after checking in onnxruntime that
    it reproduces the class matrix for the training classes. ``preprocessing`` overrides the
    model's mean/std/interpolation in the metadata (what the run's data used).
    """
    path = Path(path).expanduser()
    check_writable(path)
    text_out = None
    if with_text:
        text_out = (
            Path(text_path).expanduser() if text_path else path.with_name(path.stem + "-text.onnx")
        )
        check_writable(text_out)
    source = export_source(model)
    with torch.no_grad():
        image_model, writer = build_image_model(source, preprocessing_of(source, preprocessing))
        text_model = build_text_model(source) if with_text else None
    if image_model.ByteSize() < PROTOBUF_LIMIT:  # the checker cannot take larger protos
        onnx.checker.check_model(image_model)
    text_cos = None
    if text_model is not None:
        text_cos = text_agreement(source, text_model)
        if not text_cos >= TEXT_MIN_COSINE:
            raise ExportMismatchError(
                f"the text graph's embeddings of the training classes differ from the class "
                f"matrix (min cosine {text_cos:.5f} < {TEXT_MIN_COSINE}); this prompt layout "
                "cannot be exported as a text graph"
            )
    size = save_model(image_model, path)
    text_size = save_model(text_model, text_out) if text_model is not None else None
    int8, int4 = integer_weights(image_model.graph.initializer)
    notes = json.loads(dict((p.key, p.value) for p in image_model.metadata_props)["notes"])
    for note in notes:
        log.warning("%s", note)
    log.info("wrote %s (%.2f MB, opset %d)", path, size / 1e6, OPSET)
    return OnnxExportReport(
        path=path,
        file_bytes=size,
        int8_weights=int8,
        int4_weights=int4,
        float_weights=writer.counts["float_weights"],
        per_channel_activations=writer.counts["per_channel_activations"],
        text_path=text_out if text_model is not None else None,
        text_bytes=text_size,
        text_min_cosine=text_cos,
        notes=notes,
    )


def float_image_model(
    clip: nn.Module, adapter: nn.Module | None, text_features: torch.Tensor, logit_scale: float
) -> onnx.ModelProto:
    """The same graph in float32 from a float (or quantized, quantizers ignored) model: what
    the integer graph is measured against."""
    from p4q_lightning.quant import get_spec

    source = ExportSource(
        clip=clip,
        adapter=adapter,
        text_features=text_features,
        logit_scale=logit_scale,
        classnames=[str(i) for i in range(text_features.shape[0])],
        spec=get_spec("fp"),
        model_name="float",
        pretrained=None,
        method="float",
        prompt_ctx=None,
        tokenizer=None,
    )
    preprocessing = {"size": list(image_size(clip.visual))}
    with torch.no_grad():
        return build_image_model(source, preprocessing, quantized=False)[0]
