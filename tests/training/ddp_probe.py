"""``Probe``: what a fit calibrated and computed in its first steps, on every rank, for the
DDP tests (a callback named by class path in their configs, so it runs inside the DDP ranks)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from p4q_lightning.callbacks.calibration import CalibrationCallback
from p4q_lightning.module import P4QModule


def quantizer_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every calibrated buffer (student and adapter quantizers) of a module."""
    return {
        k: v.detach().cpu().clone() for k, v in module.state_dict().items() if "quantizer." in k
    }


def digest(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two numbers that differ when any value of ``state`` differs (rank agreement check)."""
    flat = torch.cat([state[k].double().flatten() for k in sorted(state)])
    weights = torch.arange(flat.numel(), dtype=torch.float64) % 97 + 1
    return torch.stack([flat.sum(), (flat * weights).sum()])


class Probe(Callback):
    """Records, at the start of training, the fit's calibrated student and, calibrated by the
    real :class:`CalibrationCallback` on this fit's datamodule, fresh students of ``presets``;
    the (all-reduced) gradients of the first ``steps`` optimizer steps; at the end, the trained
    prompt and adapter and this rank's share of the class prompts and of the cached views.
    Whether every rank holds the same calibrations is checked by gathering a digest; rank zero
    writes everything to ``out``; every rank marks the end of each stage (:meth:`teardown`)."""

    def __init__(self, out: str, presets: list[str] | None = None, steps: int = 2) -> None:
        self.out, self.presets, self.steps = out, presets or [], steps
        self.record: dict[str, Any] = {"calibrated": {}, "agree": {}, "grads": {}}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states = {str(pl_module.hparams.quant): quantizer_state(pl_module.classifier)}
        for preset in self.presets:
            other = P4QModule(**{**dict(pl_module.hparams), "quant": preset})
            dm = trainer.datamodule
            other.set_classes(dm.classnames, dm.templates)
            view = SimpleNamespace(
                datamodule=dm, is_global_zero=trainer.is_global_zero, loggers=[], global_step=0
            )
            CalibrationCallback(progress=False).calibrate(view, other)
            states[preset] = quantizer_state(other.classifier)
        for preset, state in states.items():
            gathered = trainer.strategy.all_gather(digest(state))
            self.record["agree"][preset] = bool((gathered == gathered[0]).all())
        self.record["calibrated"] = states

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, *_) -> None:
        if trainer.global_step >= self.steps:
            return
        self.record["grads"][trainer.global_step] = {
            name: p.grad.detach().cpu().clone()
            for name, p in pl_module.named_parameters()
            if p.grad is not None
        }

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["trained"] = {
            k: v.detach().cpu().clone()
            for k, v in pl_module.state_dict().items()
            if k.startswith(("classifier.prompt_learner.", "classifier.adapter."))
        }
        self.record["world_size"] = trainer.world_size
        self.record["global_step"] = trainer.global_step
        self.record["text_shard"] = list(pl_module.classifier.text_shard)
        source = pl_module._train_source  # the fit's feature cache (None: live augmentation)
        self.record["views_encoded"] = None if source is None else list(source.cache.encoded_here)
        if trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.record, self.out)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Every rank marks that it got through ``stage`` (after ``on_fit_end``/``on_test_end``
        callbacks such as the export and the comparison): ``<out>.<stage>.rank<r>``."""
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        Path(f"{self.out}.{stage}.rank{trainer.global_rank}").touch()
