"""What an ONNX export reads from a trained model: one record for both places a P4Q model
lives (a ``P4QClassifier`` after training, a ``LowBitCLIP`` loaded from a low-bit file)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.export.format import ExportMismatchError
from p4q_lightning.export.loader import LowBitCLIP, load_lowbit
from p4q_lightning.model.classifier import P4QClassifier
from p4q_lightning.quant import QuantSpec


@dataclass
class ExportSource:
    """The classifier's parts: the quantized student, adapter, class matrix and context."""

    clip: nn.Module
    adapter: nn.Module | None
    text_features: torch.Tensor
    logit_scale: float
    classnames: list[str]
    spec: QuantSpec
    model_name: str
    pretrained: str | None
    method: str
    prompt_ctx: torch.Tensor | None
    tokenizer: Callable[..., torch.Tensor] | None
    #: why the context cannot take new class names (None: it can)
    text_refusal: str | None = None


def from_classifier(model: P4QClassifier) -> ExportSource:
    """The parts of a trained (and calibrated) ``P4QClassifier``."""
    if not model.traits.quantized:
        raise ExportMismatchError(
            f"method={model.method!r} has no quantized student; the ONNX export writes the "
            "low-bit student of a p4q or ptq run"
        )
    if model.needs_calibration:
        raise ExportMismatchError(
            "the student is not calibrated yet: calibrate it (classifier.calibrate) first"
        )
    if model.model_name is None:
        raise ExportMismatchError("this classifier was not built from an open_clip model name")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            text = model.student_text_features().detach().float()
    finally:
        model.train(was_training)
    learner = model.prompt_learner
    refusal = None
    ctx = None
    if learner is None:
        refusal = f"method {model.method!r} has no learned prompt context"
    elif learner.class_specific:
        refusal = "the context is class-specific (one per training class)"
    elif learner.class_token_position != "end":
        refusal = (
            f"the class name sits at the {learner.class_token_position} of the prompt, not the end"
        )
    if learner is not None:
        ctx = learner.ctx.detach().float()
    return ExportSource(
        clip=model.student,
        adapter=model.adapter,
        text_features=text,
        logit_scale=float(model.logit_scale),
        classnames=list(model.classnames),
        spec=model.quant_spec,
        model_name=model.model_name,
        pretrained=model.pretrained,
        method=model.method,
        prompt_ctx=ctx,
        tokenizer=model.tokenizer,
        text_refusal=refusal,
    )


def from_lowbit(model: LowBitCLIP) -> ExportSource:
    """The parts of a model loaded with ``load_lowbit`` (without ``int8=True``)."""
    if model.int8:
        raise ExportMismatchError(
            "this model runs int8 torch kernels; export the fake-quant model instead: "
            "load_lowbit(path) without int8=True"
        )
    if model.text_features is None:
        raise ExportMismatchError(
            "this low-bit file has no classifier head (class names and text features); "
            "export it from a run's checkpoint"
        )
    info = model.info
    extra = dict(info.get("extra") or {})
    ctx = model.prompt_ctx
    refusal = None
    if ctx is None:
        refusal = "the file holds no learned prompt context"
    elif ctx.dim() != 2:
        refusal = "the context is class-specific (one per training class)"
    if model.logit_scale is None:
        raise ExportMismatchError("this low-bit file has text features but no logit scale")
    return ExportSource(
        clip=model.clip,
        adapter=model.adapter,
        text_features=F.normalize(model.text_features.detach().float(), dim=-1),
        logit_scale=float(model.logit_scale),
        classnames=list(model.classnames),
        spec=model.spec,
        model_name=info["model"]["name"],
        pretrained=info["model"].get("pretrained"),
        method=str(extra.get("method", "p4q")),
        prompt_ctx=None if ctx is None else ctx.detach().float(),
        tokenizer=model.tokenizer,
        text_refusal=refusal,
    )


def export_source(model: P4QClassifier | LowBitCLIP | str | os.PathLike[str]) -> ExportSource:
    """Parts of a ``P4QClassifier``, a ``LowBitCLIP`` or a low-bit file's path."""
    if isinstance(model, (str, os.PathLike)):
        model = load_lowbit(model)
    if isinstance(model, P4QClassifier):
        return from_classifier(model)
    if isinstance(model, LowBitCLIP):
        return from_lowbit(model)
    raise TypeError(
        f"export_onnx takes a P4QClassifier, a LowBitCLIP or a low-bit file path, not "
        f"{type(model).__name__} (a P4QModule: pass module.classifier)"
    )
