"""Slim checkpoints: drop the frozen CLIP weights, rebuild them from name + pretrained on load.

A checkpoint keeps the prompt context, the adapter, the student's quantizer parameters (scales,
zero points, ranges), the optimiser/scheduler state and the hyperparameters (model identity);
a ViT-B/32 one is a few MB instead of two copies of the 600 MB float model. On load the
student's weights are put back on their grid from the rebuilt float weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch.nn.modules.module import _IncompatibleKeys

from p4q_lightning.quant import (
    ActivationQuantizer,
    Log2Quantizer,
    WeightQuantizer,
    is_calibrated,
    quant_modules,
)

if TYPE_CHECKING:  # a P4QModule; training/ does not import module.py (no import cycle)
    from lightning.pytorch import LightningModule

META_KEY = "p4q"
QUANTIZER_TYPES = (ActivationQuantizer, WeightQuantizer, Log2Quantizer)
PREFIX = "classifier."  # where P4QModule keeps its P4QClassifier
FROZEN_PREFIXES = (PREFIX + "teacher.", PREFIX + "student.")
# top-level names of checkpoints written before the classifier was its own module
_UNPREFIXED = ("teacher.", "student.", "prompt_learner.", "adapter.")


def kept_student_keys(module: LightningModule) -> set[str]:
    """State-dict keys of the student that a rebuild cannot recover: quantizer buffers."""
    model = module.classifier
    if model.student is model.teacher:
        return set()
    keys = set()
    for name, sub in model.student.named_modules():
        if isinstance(sub, QUANTIZER_TYPES):
            keys.update(f"{PREFIX}student.{name}.{b}" for b, _ in sub.named_buffers(recurse=False))
    return keys


def with_classifier_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of an earlier checkpoint layout (``prompt_learner.ctx``) under ``classifier.``."""
    return {(PREFIX + k if k.startswith(_UNPREFIXED) else k): v for k, v in state.items()}


def is_rebuildable(key: str, kept: set[str]) -> bool:
    return key.startswith(FROZEN_PREFIXES) and key not in kept


def filter_state_dict(
    module: LightningModule, state: dict[str, Any], prefix: str = ""
) -> dict[str, Any]:
    kept = kept_student_keys(module)
    for key in [k for k in state if k.startswith(prefix)]:
        if is_rebuildable(key[len(prefix) :], kept):
            del state[key]
    return state


def load_state_dict(
    module: LightningModule,
    state: Mapping[str, Any],
    strict: bool,
    assign: bool,
    load: Callable[..., Any],
) -> _IncompatibleKeys:
    """Load a slim (or full) state dict; rebuilt frozen weights count as present."""
    model = module.classifier
    if any(bool(getattr(m, "weights_frozen", False)) for _, m in quant_modules(model.student)):
        # Weights already on another calibration's grid: start again from the float weights.
        model.rebuild_student()
    result = load(with_classifier_prefix(state), strict=False, assign=assign)
    kept = kept_student_keys(module)
    missing = [k for k in result.missing_keys if not is_rebuildable(k, kept)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(
            "checkpoint does not match this P4QModule: "
            + (f"missing {missing[:8]} " if missing else "")
            + (f"unexpected {unexpected[:8]} " if unexpected else "")
            + "(was it trained with another method, adapter or prompt setting?)"
        )
    after_load(module)
    return _IncompatibleKeys(missing, unexpected)


def after_load(module: LightningModule) -> None:
    """Put a calibrated student's weights back on the grid; refresh derived caches."""
    model = module.classifier
    if model.student is not model.teacher and is_calibrated(model.student):
        for _, qmod in quant_modules(model.student):
            qmod.freeze_weights()
    if model.prompt_learner is not None and is_calibrated(model.student):
        from p4q_lightning.model.text_encoder import TextTower

        model.prompt_learner.set_token_embedding(TextTower(model.student).token_embedding)
    model.invalidate_text()


def save_metadata(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    model = module.classifier
    checkpoint[META_KEY] = {
        "classnames": list(model.classnames),
        "templates": list(model.templates),
        "clip_fingerprint": model.teacher_fingerprint(),
        "calibrated": bool(is_calibrated(model.student)),
    }


def load_metadata(module: LightningModule, checkpoint: Mapping[str, Any]) -> None:
    """Check the rebuilt CLIP is the one trained on, and restore the class list."""
    meta = checkpoint.get(META_KEY)
    if not meta:
        return
    saved = meta.get("clip_fingerprint")
    if saved is not None:
        now = module.classifier.teacher_fingerprint()
        if not math.isclose(saved, now, rel_tol=1e-6, abs_tol=1e-6):
            hp = module.hparams
            raise ValueError(
                "this checkpoint was trained on other CLIP weights than "
                f"model_name={hp.model_name!r}, "
                f"pretrained={hp.pretrained!r} (init_seed={hp.init_seed}) build now (fingerprint "
                f"{saved:.6g} vs {now:.6g}); point `pretrained` at the original weights"
            )
    if meta.get("classnames") and not module.classifier.classnames:
        module.set_classes(meta["classnames"], meta.get("templates"))
