"""Slim checkpoints: drop the frozen CLIP weights, rebuild them from name + pretrained on load.

A checkpoint keeps the prompt context, the adapter, the student's quantizer parameters (scales,
zero points, ranges), the optimiser/scheduler state and the hyperparameters (model identity);
a ViT-B/32 one is a few MB instead of two copies of the 600 MB float model. On load the
student's weights are put back on their grid from the rebuilt float weights, after checking
that no tensor is NaN/inf and that the model is built with the settings it was trained with.
:class:`AtomicCheckpointIO` writes each file beside its final name, fsyncs and renames it, so a
failed write (a full disk) leaves the previous ``last.ckpt`` whole.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.nn.modules.module import _IncompatibleKeys

from p4q_lightning.args import AdapterArgs, PromptArgs, as_group
from p4q_lightning.files import atomic_write
from p4q_lightning.legacy import group_flat_hparams, with_classifier_prefix
from p4q_lightning.quant import (
    ActivationQuantizer,
    Log2Quantizer,
    WeightQuantizer,
    is_calibrated,
    quant_modules,
)

if TYPE_CHECKING:
    from p4q_lightning.model.classifier import P4QClassifier

META_KEY = "p4q"
QUANTIZER_TYPES = (ActivationQuantizer, WeightQuantizer, Log2Quantizer)
PREFIX = "classifier."  # where P4QModule keeps its P4QClassifier
FROZEN_PREFIXES = (PREFIX + "teacher.", PREFIX + "student.")


def kept_student_keys(model: P4QClassifier) -> set[str]:
    """State-dict keys of the student that a rebuild cannot recover: quantizer buffers and
    CLIP-LoRA's factors."""
    if model.student is model.teacher:
        return set()
    keys = set()
    for name, sub in model.student.named_modules():
        if isinstance(sub, QUANTIZER_TYPES):
            keys.update(f"{PREFIX}student.{name}.{b}" for b, _ in sub.named_buffers(recurse=False))
    # CLIP-LoRA's factors live inside the student and are trained, so a rebuild cannot recover them
    keys.update(
        f"{PREFIX}student.{name}"
        for name, _ in model.student.named_parameters()
        if name.endswith((".lora_A", ".lora_B"))
    )
    return keys


def is_rebuildable(key: str, kept: set[str]) -> bool:
    return key.startswith(FROZEN_PREFIXES) and key not in kept


def filter_state_dict(
    model: P4QClassifier, state: dict[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """``state`` (a P4QModule's, keys under ``prefix``) without the rebuildable frozen weights."""
    kept = kept_student_keys(model)
    for key in [k for k in state if k.startswith(prefix)]:
        if is_rebuildable(key[len(prefix) :], kept):
            del state[key]
    return state


def load_state_dict(
    model: P4QClassifier,
    state: Mapping[str, Any],
    strict: bool,
    assign: bool,
    load: Callable[..., Any],
) -> _IncompatibleKeys:
    """Load a slim (or full) state dict of the module holding ``model`` with ``load`` (its
    ``nn.Module.load_state_dict``); rebuilt frozen weights count as present."""
    if any(bool(getattr(m, "weights_frozen", False)) for _, m in quant_modules(model.student)):
        # Weights already on another calibration's grid: start again from the float weights.
        model.rebuild_student()
    result = load(with_classifier_prefix(state, PREFIX), strict=False, assign=assign)
    kept = kept_student_keys(model)
    missing = [k for k in result.missing_keys if not is_rebuildable(k, kept)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(
            "checkpoint does not match this P4QModule: "
            + (f"missing {missing[:8]} " if missing else "")
            + (f"unexpected {unexpected[:8]} " if unexpected else "")
            + "(was it trained with another method, adapter or prompt setting?)"
        )
    after_load(model)
    return _IncompatibleKeys(missing, unexpected)


def after_load(model: P4QClassifier) -> None:
    """Put a calibrated student's weights back on the grid; refresh derived caches."""
    if model.student is not model.teacher and is_calibrated(model.student):
        for _, qmod in quant_modules(model.student):
            qmod.freeze_weights()
    if model.prompt_learner is not None and is_calibrated(model.student):
        from p4q_lightning.model.text_encoder import TextTower

        model.prompt_learner.set_token_embedding(TextTower(model.student).token_embedding)
    model.invalidate_text()


def save_metadata(model: P4QClassifier, checkpoint: dict[str, Any]) -> None:
    """The class list, templates, CLIP fingerprint and calibration state beside the tensors."""
    checkpoint[META_KEY] = {
        "classnames": list(model.classnames),
        "templates": list(model.templates),
        "clip_fingerprint": model.teacher_fingerprint(),
        "calibrated": bool(is_calibrated(model.student)),
    }


# what each part of a state dict is, for messages (first matching prefix wins)
_PARTS = (
    ("prompt_learner.", "the prompt context"),
    ("adapter.", "the adapter"),
    ("student.", "the student's quantizer parameters"),
    ("", "a tensor"),
)


class NonFiniteCheckpointError(ValueError):
    """A checkpoint whose prompt, adapter or quantizer tensors hold NaN or inf."""


def _part(key: str) -> str:
    bare = key.removeprefix(PREFIX)
    return next(text for prefix, text in _PARTS if bare.startswith(prefix))


DIVERGED = (
    "The run that wrote it diverged (or the file is damaged): use an earlier checkpoint of the "
    "run (checkpoints/epoch=*.ckpt) or train again, e.g. with a lower learning rate"
)


def check_finite(state: Mapping[str, Any], source: str, fix: str = DIVERGED) -> None:
    """Refuse a state dict with NaN/inf in a floating tensor, naming the checkpoint and the
    tensors (a diverged run; evaluating it would report chance accuracy and a NaN loss)."""
    bad = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        named = ", ".join(f"{key} ({_part(key)})" for key in bad[:4])
        raise NonFiniteCheckpointError(
            f"checkpoint {source} holds NaN or inf in {len(bad)} tensor(s): {named}"
            f"{', ...' if len(bad) > 4 else ''}. {fix}"
        )


def _identity(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide what a checkpoint's tensors mean (not paths or batch sizes)."""
    grouped = group_flat_hparams(hparams)
    prompt = as_group(PromptArgs, grouped.get("prompt") or {}, "model.prompt")
    adapter = as_group(AdapterArgs, grouped.get("adapter") or {}, "model.adapter")
    return {
        "method": grouped.get("method", "p4q"),
        "quant": grouped.get("quant", "w8a8"),
        "quant_overrides": grouped.get("quant_overrides") or None,
        "prompt.n_ctx": prompt.n_ctx,
        "prompt.ctx_init": prompt.ctx_init,
        "prompt.class_specific": prompt.class_specific,
        "prompt.class_token_position": prompt.class_token_position,
        "adapter.enabled": adapter.enabled,
        "adapter.reduction": adapter.reduction,
        "adapter.ratio": adapter.ratio,
        "adapter.bias": adapter.bias,
        "logit_scale": grouped.get("logit_scale"),
    }


def check_settings(saved: Mapping[str, Any], built: Mapping[str, Any], source: str) -> None:
    """Refuse to load a checkpoint into a model built with other settings (``--model.quant
    w8a8`` against a w4a4 checkpoint would load w4a4 ranges into w8a8 quantizers)."""
    ours, theirs = _identity(built), _identity(saved)
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        pairs = ", ".join(f"model.{k}: {theirs[k]!r} in it, {ours[k]!r} now" for k in differ[:4])
        raise ValueError(
            f"checkpoint {source} was trained with other model settings than this run builds "
            f"({pairs}); drop the changed options to evaluate or resume it, or fit a new run "
            "with them"
        )


def load_metadata(
    model: P4QClassifier, checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], source: str
) -> tuple[list[str], list[str] | None] | None:
    """Refuse non-finite tensors and settings that conflict with ``hparams`` (what the module
    was built with); check the rebuilt CLIP is the one trained on. Returns the saved
    ``(classnames, templates)`` for the caller to set when ``model`` has no classes yet, else
    None. ``source`` names the checkpoint in messages."""
    check_finite(checkpoint.get("state_dict") or {}, source)
    saved = checkpoint.get("hyper_parameters")
    if isinstance(saved, Mapping):
        check_settings(saved, hparams, source)
    meta = checkpoint.get(META_KEY)
    if not meta:
        return None
    saved = meta.get("clip_fingerprint")
    if saved is not None:
        now = model.teacher_fingerprint()
        if not math.isclose(saved, now, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(
                "this checkpoint was trained on other CLIP weights than "
                f"model_name={hparams['model_name']!r}, "
                f"pretrained={hparams['pretrained']!r} (init_seed={hparams['init_seed']}) build "
                f"now (fingerprint {saved:.6g} vs {now:.6g}); point `pretrained` at the original "
                "weights"
            )
    if meta.get("classnames") and not model.classnames:
        return list(meta["classnames"]), meta.get("templates")
    return None


def save_atomically(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in ``path``'s directory, flushed to disk (fsync) and
    renamed over ``path``; on any failure ``path`` keeps its previous contents.

    The bytes are serialised in memory first (a slim checkpoint is a few MB), so a failing
    write is the file system's own error (``No space left on device``), not torch's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise OSError(
            err.errno,
            f"cannot write checkpoint {path}: {err.strerror or err} ({kept}); free space on "
            "that disk (or set the checkpoint dirpath elsewhere) and resume with "
            "--ckpt_path last",
        ) from err
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing local files with :func:`save_atomically`.

    Lightning's own writer fills a temporary file in the system temp directory and moves it;
    across file systems the move is a copy, which a full disk leaves truncated under the final
    name (``--ckpt_path last`` then cannot resume). Remote paths (``s3://``) keep Lightning's.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)
