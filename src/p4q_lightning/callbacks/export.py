"""Write the low-bit model at the end of fit: ``LowBitExportCallback``."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from p4q_lightning.export.format import check_writable
from p4q_lightning.export.from_module import export_module
from p4q_lightning.export.writer import ExportReport
from p4q_lightning.methods import exportable_methods, traits

log = logging.getLogger(__name__)


def run_dir(trainer: Trainer) -> Path:
    """Where a run's artefacts go: the first logger's directory, else ``default_root_dir``.

    Under DDP this is a collective (``trainer.log_dir`` broadcasts rank zero's answer, so every
    rank agrees even where a logger numbers its versions per rank): call it on every rank at
    the same point, as the callbacks here do in ``setup``, and never from rank-zero-only code,
    where rank zero would wait forever for ranks that never enter the broadcast.
    """
    for candidate in (getattr(trainer, "log_dir", None), trainer.default_root_dir):
        if candidate:
            return Path(candidate)
    return Path.cwd()


class RunDirectory:
    """The run directory of the current stage, resolved on every rank in ``setup`` (a
    collective under DDP, see :func:`run_dir`) and kept for the rank-zero-only code after it."""

    def __init__(self) -> None:
        self.value: Path | None = None

    def resolve(self, trainer: Trainer) -> Path:
        """Call from a hook every rank runs (``setup``)."""
        self.value = run_dir(trainer)
        return self.value

    def get(self, trainer: Trainer) -> Path:
        """The resolved directory; without ``setup`` (a direct call), resolved here on one
        process only (a collective would hang under DDP, so this refuses it)."""
        if self.value is not None:
            return self.value
        if trainer.world_size > 1:
            raise RuntimeError(
                "the run directory was not resolved in setup(): under DDP it must be resolved "
                "on every rank (run the callback through the Trainer)"
            )
        return self.resolve(trainer)


class LowBitExportCallback(Callback):
    """Exports the calibrated student, learned prompt and adapter as real integers after fit.

    The file (safetensors + JSON metadata, written atomically) loads with
    :func:`p4q_lightning.load_lowbit`. Only the quantized methods (``p4q``, ``ptq``) export;
    other methods are skipped with a log line.

    Args:
        dirpath: output directory (default: the run directory, see :func:`run_dir`).
        filename: file name inside ``dirpath``.
        after: ``fit`` (end of training), ``test`` (end of testing) or ``both``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "model-lowbit.safetensors",
        after: str = "fit",
    ) -> None:
        if after not in ("fit", "test", "both"):
            raise ValueError(f"after={after!r}: use 'fit', 'test' or 'both'")
        self.dirpath, self.filename, self.after = dirpath, filename, after
        self.report: ExportReport | None = None
        self.run_directory = RunDirectory()

    def path(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath) / self.filename
        return self.run_directory.get(trainer) / self.filename

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the run directory on every rank, then (rank zero) refuse an unwritable
        export path before the fit (or test) starts, not after it."""
        self.run_directory.resolve(trainer)
        exports_after = {"fit": ("fit", "both"), "test": ("test", "both")}.get(stage, ())
        method = getattr(getattr(pl_module, "classifier", None), "method", None)
        if self.after in exports_after and method in exportable_methods():
            if trainer.is_global_zero:
                check_writable(self.path(trainer))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.after in ("fit", "both"):
            self.export(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.after in ("test", "both"):
            self.export(trainer, pl_module)

    @rank_zero_only
    def export(self, trainer: Trainer, pl_module: LightningModule) -> ExportReport | None:
        model = getattr(pl_module, "classifier", None)  # a P4QClassifier (P4QModule has one)
        method = getattr(model, "method", None)
        if method not in exportable_methods():
            refusal = traits(method).export_refusal if method is not None else None
            log.info(
                "LowBitExportCallback: method %r is not exported: %s",
                method,
                refusal or "it has no low-bit student",
            )
            return None
        self.report = export_module(model, self.path(trainer), trainer)
        metrics: dict[str, Any] = {
            "export/megabytes": self.report.file_bytes / 1e6,
            "export/compression_vs_float32": self.report.ratio,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                log_artifact(logger.experiment, self.report.path)
        log.info(
            "low-bit model written to %s (%.2f MB, %.2fx smaller than float32)",
            self.report.path,
            self.report.file_bytes / 1e6,
            self.report.ratio,
        )
        return self.report


def log_artifact(run: Any, path: Path) -> None:
    """The low-bit file as a W&B ``model`` artifact of ``run`` (uploaded by `wandb sync` when
    offline), named after the run so every run's export stays its own artifact."""
    import wandb

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"lowbit-{run.name or run.id}")
    artifact = wandb.Artifact(name, type="model", metadata={"file": Path(path).name})
    artifact.add_file(str(path))
    run.log_artifact(artifact)
