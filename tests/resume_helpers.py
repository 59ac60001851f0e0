"""Callbacks and comparisons for the exact-resume and DDP-equality tests."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class Interrupted(RuntimeError):
    """Raised by :class:`StopAtStep` to cut a fit short."""


class StopAtStep(Callback):
    """Ends the fit abruptly before global step ``step``: raises, or SIGKILLs its own process
    (as a crash or an OOM killer would: no handler, no checkpoint of its own)."""

    def __init__(self, step: int, how: str = "raise") -> None:
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupted(f"stopped before step {self.step}")


def trained_state(module: LightningModule) -> dict[str, torch.Tensor]:
    """Everything a fit changes: prompt context, adapter weights and quantizer ranges."""
    return {
        k: v.detach().cpu().clone()
        for k, v in module.state_dict().items()
        if k.startswith(("classifier.prompt_learner.", "classifier.adapter."))
    }


class SaveTrainedState(Callback):
    """Writes :func:`trained_state` (rank zero) at the end of the fit, for another process."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save(
                {
                    "state": trained_state(pl_module),
                    "global_step": trainer.global_step,
                    "text_shard": list(pl_module.classifier.text_shard),
                    "world_size": trainer.world_size,
                    "views_encoded": None
                    if pl_module._train_source is None
                    else list(pl_module._train_source.cache.encoded_here),
                },
                self.out,
            )
