"""Optimisation as the references do it: SGD for the prompt context, AdamW for the adapter, each
with a constant warmup followed by a per-step cosine decay to zero.

Both live in one :class:`PromptAdapterOptimizer` (a param group per part), so Lightning's
automatic optimisation, ``global_step``, gradient clipping and accumulation behave as usual
(two optimisers would need manual optimisation, which counts a step per optimiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from p4q_lightning.module import P4QModule


class PromptAdapterOptimizer(Optimizer):
    """Per param group either SGD (``algorithm="sgd"``: momentum, dampening, nesterov,
    weight decay added to the gradient) or AdamW (``algorithm="adamw"``: betas, eps, decoupled
    weight decay), with the same update rules as ``torch.optim.SGD`` and ``torch.optim.AdamW``."""

    def __init__(self, params: Iterable[dict[str, Any]]) -> None:
        defaults = dict(
            algorithm="sgd",
            lr=1e-3,
            momentum=0.0,
            dampening=0.0,
            nesterov=False,
            weight_decay=0.0,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        super().__init__(list(params), defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ("sgd", "adamw"):
                raise ValueError(f"unknown algorithm {group['algorithm']!r}: use 'sgd' or 'adamw'")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = _sgd if group["algorithm"] == "sgd" else _adamw
            for p in group["params"]:
                if p.grad is not None:
                    update(p, p.grad, group, self.state[p])
        return loss


def _sgd(p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    if group["weight_decay"]:
        grad = grad.add(p, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    p.add_(grad, alpha=-group["lr"])


def _adamw(
    p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
) -> None:
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = float(state["step"])
    p.mul_(1 - group["lr"] * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


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


def param_groups(module: P4QModule) -> list[dict[str, Any]]:
    """One group per trainable part, named ``prompt`` and ``adapter``."""
    hp = module.hparams
    groups: list[dict[str, Any]] = []
    if module.prompt_learner is not None:
        groups.append(
            dict(
                name="prompt",
                algorithm="sgd",
                params=[module.prompt_learner.ctx],
                lr=hp.prompt_lr,
                momentum=hp.prompt_momentum,
                weight_decay=hp.prompt_weight_decay,
            )
        )
    if module.adapter is not None:
        groups.append(
            dict(
                name="adapter",
                algorithm="adamw",
                params=list(module.adapter.parameters()),
                lr=hp.adapter_lr,
                eps=hp.adapter_eps,
                weight_decay=hp.adapter_weight_decay,
            )
        )
    return groups


def configure(module: P4QModule) -> dict[str, Any]:
    """The optimiser and its step-wise schedule for the trainable parts of ``module``."""
    groups = param_groups(module)
    if not groups:
        raise ValueError(f"method={module.method!r} has no trainable parameters")
    optimizer = PromptAdapterOptimizer(groups)
    hp = module.hparams
    lambdas = [
        WarmupCosine(hp.warmup_lr / g["lr"] if hp.warmup_epochs > 0 and g["lr"] > 0 else 1.0)
        for g in groups
    ]
    scheduler = LambdaLR(optimizer, lambdas)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def finalize_schedules(module: P4QModule) -> None:
    """Fill in the schedule lengths once the trainer knows them (at the start of training)."""
    trainer = module.trainer
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            "the cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
        )
    per_epoch = trainer.num_training_batches
    per_epoch = (
        per_epoch / max(1, trainer.accumulate_grad_batches) if math.isfinite(per_epoch) else 0
    )
    warmup = int(round(module.hparams.warmup_epochs * per_epoch))
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if not isinstance(sched, LambdaLR):
            continue
        groups = sched.optimizer.param_groups
        for fn, group, base in zip(sched.lr_lambdas, groups, sched.base_lrs, strict=True):
            if isinstance(fn, WarmupCosine):
                fn.warmup_steps, fn.total_steps = warmup, int(total)
                group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]
