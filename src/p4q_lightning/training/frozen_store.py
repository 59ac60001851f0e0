"""Frozen work done once per sweep: stored on disk, keyed by everything that determines it.

A sweep repeats work that no training step changes: the PTQ calibration of the student (its
weights put on the grid, its activation ranges, the adapter's input ranges) and the cached image
features (:mod:`~p4q_lightning.training.feature_cache`). They depend only on the model and its
weights, the quantization spec, the calibration images, the class names and templates (and, for
features, the split, views and seed), so a run that finds them in ``model.features.cache_dir``
under the same key loads them instead. Writes are atomic and taken under a file lock: processes
(SLURM tasks on a shared file system) that need the same entry wait for the first to finish it
and then load it, so it is computed once. The loaded state is the computed one bit for bit, so
numbers equal those of a run without the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from p4q_lightning.distributed import world
from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

T = TypeVar("T")
# datamodule settings that cannot change which calibration images are read or how
NOT_CALIBRATION = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "shots",
    "test_datasets",
    "split_dir",
)


def digest(parts: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able description."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), held for the block; works across
    processes and, on file systems with POSIX locks, across machines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# seconds this process spent on frozen work (computing or loading), per kind: what `p4q run`
# records in results.json and the sweep benchmark compares
SPENT: dict[str, float] = {}


def spent() -> dict[str, float]:
    return {k: round(v, 3) for k, v in SPENT.items()}


def load_or_compute(
    directory: str | os.PathLike[str] | None,
    name: str,
    compute: Callable[[], T],
    to_payload: Callable[[T], Any],
    from_payload: Callable[[Any], T],
    kind: str = "other",
) -> tuple[T, bool]:
    """``(value, loaded)``: ``name`` from ``directory`` when stored, else computed (under the
    entry's lock, re-checked once the lock is held) and stored atomically. Without a directory,
    or under several processes of one run (DDP: the ranks compute together), just computes.
    The time taken is added to ``SPENT[kind]``."""
    start = time.perf_counter()
    try:
        return _load_or_compute(directory, name, compute, to_payload, from_payload)
    finally:
        SPENT[kind] = SPENT.get(kind, 0.0) + time.perf_counter() - start


def _load_or_compute(
    directory: str | os.PathLike[str] | None,
    name: str,
    compute: Callable[[], T],
    to_payload: Callable[[T], Any],
    from_payload: Callable[[Any], T],
) -> tuple[T, bool]:
    if directory is None or world()[1] > 1:
        return compute(), False
    path = Path(directory).expanduser() / name
    found = _load(path, from_payload)
    if found is not None:
        return found, True
    with file_lock(path.with_name(path.name + ".lock")):
        found = _load(path, from_payload)  # another process finished it while we waited
        if found is not None:
            return found, True
        value = compute()
        with atomic_write(path) as tmp:
            torch.save(to_payload(value), tmp)
    return value, False


def _load(path: Path, from_payload: Callable[[Any], T]) -> T | None:
    if not path.is_file():
        return None
    try:
        return from_payload(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # a corrupt or foreign entry is recomputed, not fatal
        log.warning("ignoring unreadable stored entry %s (%s); computing it again", path, err)
        return None


def calibration_data(datamodule: Any) -> dict[str, Any]:
    """The datamodule settings that decide which calibration images are read, and how."""
    data_hp = dict(getattr(datamodule, "hparams", {}) or {})
    return {k: v for k, v in data_hp.items() if k not in NOT_CALIBRATION}


def calibration_key(
    model: Any, module: Any, images: str, batch_size: int | None, max_texts: Any
) -> str:
    """Everything the calibrated student and adapter ranges depend on (``images``: the
    fingerprint of the calibration images and the settings that chose them)."""
    hp = getattr(module, "hparams", {}) or {}
    adapter = getattr(module, "adapter_args", None)
    parts = {
        "model": [hp.get("model_name"), hp.get("pretrained"), hp.get("model_config")],
        "init_seed": hp.get("init_seed"),
        "teacher": model.teacher_fingerprint(),
        "spec": model.quant_spec.to_dict(),
        "adapter": repr(adapter) if model.adapter is not None else None,
        # the student's layout: CLIP-LoRA's wrappers rename the attention projections' tensors
        "student_keys": list(model.student.state_dict()),
        "classes": list(model.classnames),
        "templates": list(model.templates),
        "max_texts": max_texts,
        "images": images,
        "batch": batch_size,
    }
    return digest(parts)


def teacher_text_key(model: Any) -> str:
    """The float teacher's template classifier depends on its weights, classes and templates."""
    return digest(
        {
            "teacher": model.teacher_fingerprint(),
            "classes": list(model.classnames),
            "templates": list(model.templates),
        }
    )


def _adapter_buffers(model: Any) -> list[torch.Tensor]:
    from p4q_lightning.quant.quantizer import CachedBufferState

    if model.adapter is None:
        return []
    return [
        buffer
        for module in model.adapter.modules()
        if isinstance(module, CachedBufferState)
        for buffer in module.buffers(recurse=False)
    ]


def _trained_student_keys(model: Any) -> set[str]:
    """The student's parameters that train (CLIP-LoRA's factors): the run's own initialisation,
    not calibration's work, so never stored or restored."""
    return {name for name, p in model.student.named_parameters() if p.requires_grad}


def calibrated_state(model: Any, stats: Any) -> dict[str, Any]:
    """What calibration changed: the student's frozen weights (on the grid) and buffers, the
    adapter's quantizer buffers (the adapter's and LoRA's weights are the run's own
    initialisation), and the statistics."""
    trained = _trained_student_keys(model)
    return {
        "student": {
            k: v.detach().cpu() for k, v in model.student.state_dict().items() if k not in trained
        },
        "adapter": [b.detach().cpu() for b in _adapter_buffers(model)],
        "stats": stats,
    }


def restore_calibration(model: Any, payload: Mapping[str, Any]) -> Any:
    """Put a stored calibration onto ``model`` and finish as calibration does (the prompt
    learner takes the student's token embedding, cached text is dropped); returns the stats."""
    own = model.student.state_dict()
    trained = _trained_student_keys(model)
    stored = dict(payload["student"])
    if set(stored) != set(own) - trained:
        raise ValueError("the stored student does not have this student's layout")
    stored.update({k: own[k] for k in trained})  # this run's own initialisation stays
    model.student.load_state_dict(stored)
    buffers = _adapter_buffers(model)
    if len(buffers) != len(payload["adapter"]):
        raise ValueError("the stored adapter ranges do not fit this adapter")
    with torch.no_grad():
        for buffer, value in zip(buffers, payload["adapter"], strict=True):
            buffer.copy_(value)
    model.calibrate([], progress=False)  # nothing left to calibrate: only the finishing steps
    return payload["stats"]
