"""Export a trained ``P4QClassifier`` (student, prompt, adapter, class names) in one call."""

from __future__ import annotations

import logging
import os
from typing import Any

import open_clip
import torch

from p4q_lightning.export import adapters
from p4q_lightning.export.format import ExportMismatchError
from p4q_lightning.export.writer import ExportReport, export_lowbit
from p4q_lightning.methods import exportable_methods, quantized_methods
from p4q_lightning.model.classifier import P4QClassifier

log = logging.getLogger(__name__)


def adapter_config(model: P4QClassifier) -> dict[str, Any] | None:
    """How :func:`load_lowbit` rebuilds the classifier's adapter: its registered kind (JSON)."""
    return None if model.adapter is None else adapters.describe(model.adapter)


def run_extra(model: P4QClassifier, trainer: Any = None) -> dict[str, Any]:
    """Free-form facts about the run stored next to the weights (method, data, shots...)."""
    extra: dict[str, Any] = {
        "method": model.method,
        "quant": model.quant_spec.name,
        "templates": list(model.templates),
        "logit_scale": float(model.logit_scale),
    }
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    for key in ("dataset", "dataset_name", "shots", "seed"):
        value = getattr(dm, key, None) if dm is not None else None
        if value is None and dm is not None:
            value = getattr(getattr(dm, "hparams", {}), "get", lambda _k, _d=None: None)(key)
        if isinstance(value, (str, int, float, bool)):
            extra[key] = value
    if trainer is not None:
        extra["epochs"] = int(trainer.current_epoch)
        extra["global_step"] = int(trainer.global_step)
    extra["init_seed"] = model.init_seed
    return extra


@torch.no_grad()
def export_module(
    model: P4QClassifier, path: str | os.PathLike[str], trainer: Any = None
) -> ExportReport:
    """Write the classifier's calibrated student and classifier head as a low-bit file.

    Works for the quantized methods (``p4q``, ``ptq``): the text features are the learned prompt
    through the quantized text tower (``p4q``) or the template classifier (``ptq``). ``model``
    is a :class:`P4QClassifier` (``P4QModule.classifier``); its teacher must have been built from
    an open_clip name (:meth:`P4QClassifier.build`), which the file records.
    """
    if model.traits.export_refusal is not None:
        raise ExportMismatchError(
            f"method={model.method!r} does not export to the low-bit file: "
            f"{model.traits.export_refusal}"
        )
    if model.method not in quantized_methods():
        raise ExportMismatchError(
            f"method={model.method!r} has no quantized student to export; low-bit export applies "
            f"to method {' or '.join(exportable_methods())}"
        )
    if model.needs_calibration:
        raise ExportMismatchError(
            "the student is not calibrated yet: run fit/validate/test with CalibrationCallback "
            "(added by P4QModule) or call classifier.calibrate(images) before exporting"
        )
    if model.model_name is None:
        raise ExportMismatchError(
            "this classifier was not built from an open_clip model name "
            "(use P4QClassifier.build), so the file could not name the model to rebuild"
        )
    config = open_clip.get_model_config(model.model_name)
    was_training = model.training
    model.eval()
    try:
        text = model.student_text_features().detach().float()
        ctx = model.prompt_learner.ctx.detach() if model.prompt_learner is not None else None
        return export_lowbit(
            path,
            model.student,
            model_name=model.model_name,
            pretrained=model.pretrained,
            model_config=config,
            classnames=list(model.classnames),
            text_features=text,
            logit_scale=float(model.logit_scale),
            prompt_ctx=ctx,
            adapter=model.adapter,
            adapter_config=adapter_config(model),
            extra=run_extra(model, trainer),
        )
    finally:
        model.train(was_training)
