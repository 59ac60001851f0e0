"""Export a trained ``P4QModule`` (student, prompt, adapter, class names) in one call."""

from __future__ import annotations

import logging
import os
from typing import Any

import open_clip
import torch

from p4q_lightning.export import adapters
from p4q_lightning.export.format import ExportMismatchError
from p4q_lightning.export.writer import ExportReport, export_lowbit
from p4q_lightning.methods import quantized_methods

log = logging.getLogger(__name__)


def adapter_config(module: Any) -> dict[str, Any] | None:
    """How :func:`load_lowbit` rebuilds the module's adapter: its registered kind (JSON-able)."""
    adapter = getattr(module, "adapter", None)
    return None if adapter is None else adapters.describe(adapter)


def run_extra(module: Any, trainer: Any = None) -> dict[str, Any]:
    """Free-form facts about the run stored next to the weights (method, data, shots...)."""
    hp = module.hparams
    extra: dict[str, Any] = {
        "method": getattr(module, "method", None),
        "quant": module.quant_spec.name,
        "templates": list(getattr(module, "templates", []) or []),
        "logit_scale": float(module.logit_scale),
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
    extra["init_seed"] = hp.get("init_seed")
    return extra


@torch.no_grad()
def export_module(module: Any, path: str | os.PathLike[str], trainer: Any = None) -> ExportReport:
    """Write ``module``'s calibrated student and classifier head as a low-bit file.

    Works for the quantized methods (``p4q``, ``ptq``): the text features are the learned prompt
    through the quantized text tower (``p4q``) or the template classifier (``ptq``).
    """
    method = getattr(module, "method", None)
    if method not in quantized_methods():
        raise ExportMismatchError(
            f"method={method!r} has no quantized student to export; low-bit export applies to "
            f"method {' or '.join(quantized_methods())}"
        )
    if getattr(module, "needs_calibration", False):
        raise ExportMismatchError(
            "the student is not calibrated yet: run fit/validate/test with CalibrationCallback "
            "(added by P4QModule) or call module.calibrate(images) before exporting"
        )
    hp = module.hparams
    name = hp.model_name
    config = open_clip.get_model_config(name)
    was_training = module.training
    module.eval()
    try:
        text = module.student_text_features().detach().float()
        ctx = (
            module.prompt_learner.ctx.detach()
            if getattr(module, "prompt_learner", None) is not None
            else None
        )
        return export_lowbit(
            path,
            module.student,
            model_name=name,
            pretrained=hp.get("pretrained"),
            model_config=config,
            classnames=list(module.classnames),
            text_features=text,
            logit_scale=float(module.logit_scale),
            prompt_ctx=ctx,
            adapter=module.adapter,
            adapter_config=adapter_config(module),
            extra=run_extra(module, trainer),
        )
    finally:
        module.train(was_training)
