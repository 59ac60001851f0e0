"""Optimisation as the references do it: SGD for the prompt context, AdamW for the adapter, each
with a constant warmup followed by a per-step cosine decay to zero.

Both live in one :class:`PromptAdapterOptimizer` (a param group per part, the update rules
delegated to ``torch.optim.SGD`` and ``torch.optim.AdamW``), so Lightning's automatic
optimisation, ``global_step``, gradient clipping and accumulation behave as usual (two optimisers
would need manual optimisation, which counts a step per optimiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from p4q_lightning.model.lora import lora_parameters

if TYPE_CHECKING:
    from p4q_lightning.args import OptimArgs
    from p4q_lightning.model.classifier import P4QClassifier


class FitLengths(Protocol):
    """The trainer numbers the schedule needs (a ``lightning.pytorch.Trainer`` has them)."""

    @property
    def estimated_stepping_batches(self) -> int | float: ...
    @property
    def num_training_batches(self) -> int | float: ...
    @property
    def accumulate_grad_batches(self) -> int: ...
    @property
    def max_epochs(self) -> int | None: ...


class PromptAdapterOptimizer(Optimizer):
    """One optimiser object for Lightning whose update rules are ``torch.optim.SGD`` (groups with
    ``algorithm="sgd"``) and ``torch.optim.AdamW`` (``algorithm="adamw"``).

    The inner torch optimisers share this object's param-group dicts and state, so learning-rate
    schedules, ``state_dict`` and checkpoints see one optimiser with one group per part.
    """

    ALGORITHMS: dict[str, type[Optimizer]] = {
        "sgd": torch.optim.SGD,
        "adamw": torch.optim.AdamW,
    }

    def __init__(self, params: Iterable[dict[str, Any]]) -> None:
        groups = list(params)
        for group in groups:
            algorithm = group.setdefault("algorithm", "sgd")
            if algorithm not in self.ALGORITHMS:
                raise ValueError(f"unknown algorithm {algorithm!r}: use 'sgd' or 'adamw'")
        super().__init__(groups, dict(lr=1e-3))
        self._inner: dict[str, Optimizer] = {}
        for algorithm, cls in self.ALGORITHMS.items():
            mine = [g for g in self.param_groups if g["algorithm"] == algorithm]
            if mine:
                self._inner[algorithm] = cls(mine)  # fills each group with its own defaults
        self._bind()

    def _bind(self) -> None:
        """Point the inner optimisers at this object's current groups and state (again after
        ``load_state_dict``, which replaces both)."""
        for algorithm, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._bind()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner.values():
            inner.step()
        return loss


class WarmupCosine:
    """LR factor per step: ``warmup_factor`` for ``warmup_steps``, then cosine to 0 at
    ``total_steps``. Plain attributes only, so the scheduler's state dict stays primitive."""

    def __init__(
        self, warmup_factor: float = 1.0, warmup_steps: int = 0, total_steps: int = 0
    ) -> None:
        self.warmup_factor = warmup_factor
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: P4QClassifier, hp: OptimArgs) -> list[dict[str, Any]]:
    """One group per trainable part of ``model``, named ``prompt``, ``adapter``, ``cache``
    (Tip-Adapter-F's keys) and ``lora`` (CLIP-LoRA's factors)."""
    groups: list[dict[str, Any]] = []
    if model.prompt_learner is not None:
        groups.append(
            dict(
                name="prompt",
                algorithm="sgd",
                params=[model.prompt_learner.ctx],
                lr=hp.prompt_lr,
                momentum=hp.prompt_momentum,
                weight_decay=hp.prompt_weight_decay,
            )
        )
    if model.adapter is not None:
        groups.append(
            dict(
                name="adapter",
                algorithm="adamw",
                params=list(model.adapter.parameters()),
                lr=hp.adapter_lr,
                eps=hp.adapter_eps,
                weight_decay=hp.adapter_weight_decay,
            )
        )
    if model.tip_cache is not None and model.tip_cache.trainable:
        groups.append(
            dict(
                name="cache",
                algorithm="adamw",
                params=[model.tip_cache.keys],
                lr=hp.cache_lr,
                eps=hp.cache_eps,
                weight_decay=hp.cache_weight_decay,
            )
        )
    lora = lora_parameters(model.student) if model.traits.lora else []
    if lora:
        groups.append(
            dict(
                name="lora",
                algorithm="adamw",
                params=lora,
                lr=hp.lora_lr,
                weight_decay=hp.lora_weight_decay,
            )
        )
    return groups


def schedule_lengths(trainer: FitLengths, warmup_epochs: float) -> tuple[int, int]:
    """(warmup, total) optimiser steps of this fit, from the trainer's documented properties.

    ``estimated_stepping_batches`` loads the training loader if it is not loaded yet, so this
    may run in ``configure_optimizers``; warmup is ``warmup_epochs`` times the optimiser steps
    of one epoch (batches per epoch / gradient accumulation).
    """
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            "the cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
        )
    if warmup_epochs > 0 and trainer.max_epochs == -1:  # Lightning did not load the loader
        raise ValueError(
            "warmup_epochs needs the number of batches per epoch, which is not known before "
            "training with max_epochs=-1 (max_steps only): set trainer.max_epochs (max_steps "
            "still stops earlier) or warmup_epochs=0"
        )
    per_epoch = trainer.num_training_batches
    per_epoch = (
        per_epoch / max(1, trainer.accumulate_grad_batches) if math.isfinite(per_epoch) else 0
    )
    return int(round(warmup_epochs * per_epoch)), int(total)


class WarmupCosineLR(LambdaLR):
    """``LambdaLR`` over :class:`WarmupCosine` factors whose shape belongs to this fit.

    Loading a checkpoint restores the step and the base rates but keeps this fit's factors, so
    a fit resumed with more epochs follows the longer schedule; the rates of the restored step
    are recomputed under it (equal to the saved ones when nothing changed).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        for group, base, fn in zip(
            self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        """The rates in force now (after a resume with longer lengths, the recomputed ones)."""
        return [group["lr"] for group in self.optimizer.param_groups]


def configure(model: P4QClassifier, hp: OptimArgs, trainer: FitLengths) -> dict[str, Any]:
    """The optimiser and its step-wise schedule over the fit ``trainer`` is about to run, for
    the trainable parts of ``model`` (``configure_optimizers``' return value)."""
    groups = param_groups(model, hp)
    if not groups:
        raise ValueError(f"method={model.method!r} has no trainable parameters")
    optimizer = PromptAdapterOptimizer(groups)
    warmup, total = schedule_lengths(trainer, hp.warmup_epochs)
    lambdas = [
        WarmupCosine(
            hp.warmup_lr / g["lr"] if hp.warmup_epochs > 0 and g["lr"] > 0 else 1.0, warmup, total
        )
        for g in groups
    ]
    scheduler = WarmupCosineLR(optimizer, lambdas)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
