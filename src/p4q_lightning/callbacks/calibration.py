"""Calibrate the PTQ student before the first step of any stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from p4q_lightning import distributed
from p4q_lightning.quant import group_statistics
from p4q_lightning.quant.calibrate import CALIB_BATCH_SIZE
from p4q_lightning.quant.quantizer import CachedBufferState
from p4q_lightning.training import frozen_store
from p4q_lightning.training.feature_cache import dataset_fingerprint

log = logging.getLogger(__name__)


class NonEmptyBatches:
    """Re-iterable view of a loader without its empty batches (every image of a batch skipped
    as corrupt with ``skip_corrupt``); refuses a loader that has no image at all."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        seen = False
        for batch in self.loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(images, torch.Tensor) and images.shape[0] == 0:
                continue
            seen = True
            yield batch
        if not seen:
            raise ValueError(
                "no calibration image could be read: every image of the calibration split was "
                "skipped as unreadable (skip_corrupt); repair or remove the corrupt files "
                "(the datamodule's `skipped` lists them) or point data at another dataset"
            )


class CalibrationCallback(Callback):
    """Calibrates ``P4QModule``'s student (and adapter input ranges) once, before the first
    training, validation, test or predict step.

    Images come from ``trainer.datamodule.calibration_dataloader()``; texts are every class
    name in every template (as the official code calibrates), at most ``max_texts`` of them.
    Skipped when the module is already calibrated (e.g. restored from a checkpoint). Logs the
    per-group statistics (mean scale, clipping ratio) and the time taken to every logger.

    The images run in batches of the datamodule's ``calib_batch_size`` (128 when it has none),
    re-cut whatever the loader's batches, the last batch being the last ``calib_batch_size``
    images (:func:`~p4q_lightning.quant.calibrate.fixed_batches`): the calibrated student does
    not depend on the training batch size or the number of processes. Under DDP every rank
    calibrates on all the calibration images, then takes rank zero's ranges (one broadcast),
    so every rank holds the same student.

    Args:
        max_texts: cap on the calibration texts (evenly subsampled); None uses all.
        progress: show progress bars (rank zero only).
    """

    def __init__(self, max_texts: int | None = None, progress: bool = True) -> None:
        self.max_texts = max_texts
        self.progress = progress
        self.stats: dict[str, dict[str, float]] = {}
        self.seconds: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = getattr(pl_module, "classifier", None)  # a P4QClassifier (P4QModule has one)
        if model is None:
            return
        self._teacher_text(model, pl_module)
        if not model.needs_calibration:
            return
        images = self._calibration_images(trainer)
        start = time.perf_counter()

        def compute() -> dict[str, dict[str, float]]:
            return model.calibrate(
                images,
                model.calibration_texts(self.max_texts),
                progress=self.progress and trainer.is_global_zero,
                batch_size=calibration_batch_size(trainer.datamodule),
            )

        # stored once per sweep in model.features.cache_dir, keyed by what determines it
        # (without a store it is computed, and timed alike)
        store = getattr(getattr(pl_module, "features_args", None), "cache_dir", None)
        key = ""
        if store is not None:
            loader = images.loader
            fingerprint = dataset_fingerprint(
                loader.dataset, {"data": frozen_store.calibration_data(trainer.datamodule)}
            )
            key = frozen_store.calibration_key(
                model, pl_module, fingerprint, calibration_batch_size(trainer.datamodule),
                self.max_texts,
            )  # fmt: skip
        stats, loaded = frozen_store.load_or_compute(
            store,
            f"calibration-{key}.pt",
            compute,
            lambda value: frozen_store.calibrated_state(model, value),
            lambda payload: frozen_store.restore_calibration(model, payload),
            kind="calibration",
        )
        if loaded:
            log.info("loaded the calibrated student from %s", store)
        distributed.broadcast_in_place(calibration_buffers(model), 0, pl_module.device)
        self.seconds = time.perf_counter() - start
        self.stats = group_statistics(stats, model.student) if stats else {}
        self._log(trainer)

    @staticmethod
    def _teacher_text(model: Any, pl_module: LightningModule) -> None:
        """The float teacher's template class embeddings from the frozen-work store (computed
        and stored once per model, classes and templates)."""
        store = getattr(getattr(pl_module, "features_args", None), "cache_dir", None)
        if model.teacher_text == "prompt" or model.has_teacher_template_text:
            return
        key = frozen_store.teacher_text_key(model) if store is not None else ""
        features, _ = frozen_store.load_or_compute(
            store,
            f"teacher-text-{key}.pt",
            lambda: model.teacher_text_features().detach().cpu(),
            lambda value: value,
            lambda payload: payload,
            kind="teacher_text",
        )
        model.use_teacher_template_text(features)

    @staticmethod
    def _calibration_images(trainer: Trainer) -> Any:
        dm = trainer.datamodule
        make = getattr(dm, "calibration_dataloader", None)
        if make is None:
            raise RuntimeError(
                "the quantized student needs calibration images: use a datamodule with a "
                "calibration_dataloader() (e.g. FewShotDataModule), or call "
                "module.classifier.calibrate(images, texts) yourself before running the trainer"
            )
        return NonEmptyBatches(make())

    def _log(self, trainer: Trainer) -> None:
        metrics = {"calibration/seconds": float(self.seconds or 0.0)}
        for group, values in self.stats.items():
            for key, value in values.items():
                metrics[f"calibration/{group}/{key}"] = float(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            worst = max(
                self.stats.items(), key=lambda kv: kv[1].get("clip_ratio", 0.0), default=None
            )
            log.info(
                "calibrated the student in %.1f s (%d groups%s)",
                self.seconds or 0.0,
                len(self.stats),
                f"; highest clipping {worst[1]['clip_ratio']:.2%} in {worst[0]}" if worst else "",
            )


def calibration_batch_size(datamodule: Any) -> int:
    """The datamodule's ``calib_batch_size`` (attribute or hyper-parameter), else 128."""
    value = getattr(datamodule, "calib_batch_size", None)
    if value is None:
        value = (getattr(datamodule, "hparams", None) or {}).get("calib_batch_size")
    return int(value) if value is not None else CALIB_BATCH_SIZE


def calibration_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every buffer calibration sets (scales, zero points, ranges, flags of the student's and
    the adapter's quantizers), in module order: the same list on every rank."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, CachedBufferState)
        for buffer in module.buffers(recurse=False)
    ]
