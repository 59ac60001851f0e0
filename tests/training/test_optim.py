"""The combined prompt/adapter optimiser matches torch's SGD and AdamW; the warmup-cosine
schedule."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import tiny_world
from p4q_lightning.module import P4QModule
from p4q_lightning.training.optim import (
    PromptAdapterOptimizer,
    WarmupCosine,
    WarmupCosineLR,
    schedule_lengths,
)


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_torch_sgd_and_adamw(nesterov):
    torch.manual_seed(0)
    a1, b1 = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    a2, b2 = a1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    ours = PromptAdapterOptimizer(
        [
            dict(
                params=[a1],
                algorithm="sgd",
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                nesterov=nesterov,
            ),
            dict(params=[b1], algorithm="adamw", lr=1e-2, eps=1e-4, weight_decay=1e-2),
        ]
    )
    sgd = torch.optim.SGD([a2], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    adamw = torch.optim.AdamW([b2], lr=1e-2, eps=1e-4, weight_decay=1e-2)
    for _ in range(5):
        g = torch.randn(4, 3), torch.randn(5)
        a1.grad, b1.grad = g[0].clone(), g[1].clone()
        a2.grad, b2.grad = g[0].clone(), g[1].clone()
        ours.step()
        sgd.step()
        adamw.step()
        torch.testing.assert_close(a1, a2)
        torch.testing.assert_close(b1, b2)
    state = ours.state_dict()
    assert len(state["param_groups"]) == 2


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    groups = [
        dict(params=[a], algorithm="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
        dict(params=[b], algorithm="adamw", lr=1e-2, eps=1e-4, weight_decay=1e-2),
    ]
    return (a, b), PromptAdapterOptimizer(groups)


def _step(params, opt, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def test_update_rules_are_torchs_own_optimisers():
    _, opt = _pair()
    assert {type(o) for o in opt._inner.values()} == {torch.optim.SGD, torch.optim.AdamW}
    only_sgd = PromptAdapterOptimizer([dict(params=[torch.zeros(2, requires_grad=True)])])
    assert [type(o) for o in only_sgd._inner.values()] == [torch.optim.SGD]


def test_schedule_and_checkpoint_reach_the_inner_optimisers():
    """A scheduler's lr and a reloaded state_dict act on the delegated steps: a resumed copy
    continues exactly like the original."""
    grads = [(torch.randn(4, 3), torch.randn(5)) for _ in range(6)]
    params, opt = _pair()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0 / (1 + s)])
    for g in grads[:3]:
        _step(params, opt, g)
        sched.step()
    saved = (
        [p.detach().clone() for p in params],
        copy.deepcopy(opt.state_dict()),
        sched.state_dict(),
    )
    for g in grads[3:]:
        _step(params, opt, g)
        sched.step()
    resumed_params, resumed = _pair(seed=1)  # other values, then the checkpoint
    with torch.no_grad():
        for p, v in zip(resumed_params, saved[0], strict=True):
            p.copy_(v)
    resumed_sched = torch.optim.lr_scheduler.LambdaLR(  # Lightning's order: build, then load
        resumed, [lambda s: 0.5**s, lambda s: 1.0 / (1 + s)]
    )
    resumed.load_state_dict(saved[1])
    resumed_sched.load_state_dict(saved[2])
    assert resumed._inner["adamw"].state is resumed.state  # rebound after loading
    for g in grads[3:]:
        _step(resumed_params, resumed, g)
        resumed_sched.step()
    for p, q in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="sgd"):
        PromptAdapterOptimizer(
            [dict(params=[torch.zeros(1, requires_grad=True)], algorithm="lion")]
        )


def test_warmup_then_cosine_to_zero():
    fn = WarmupCosine(warmup_factor=0.01, warmup_steps=2, total_steps=12)
    assert fn(0) == fn(1) == 0.01
    assert fn(2) == 1.0
    assert math.isclose(fn(7), 0.5, abs_tol=1e-9)
    assert fn(12) == pytest.approx(0.0) and fn(20) == pytest.approx(0.0)
    assert WarmupCosine()(0) == 1.0  # no lengths: a constant rate


def fake_trainer(
    stepping: float, per_epoch: float, accumulate: int = 1, max_epochs: int = 3
) -> SimpleNamespace:
    return SimpleNamespace(
        estimated_stepping_batches=stepping,
        num_training_batches=per_epoch,
        accumulate_grad_batches=accumulate,
        max_epochs=max_epochs,
    )


def test_schedule_lengths_from_the_trainer():
    # 8 batches per epoch, 2 per optimiser step, 3 epochs: 12 steps, half an epoch is 2 steps
    assert schedule_lengths(fake_trainer(12, 8, accumulate=2), 0.5) == (2, 12)
    assert schedule_lengths(fake_trainer(12, 8, accumulate=2), 0.0) == (0, 12)
    assert schedule_lengths(fake_trainer(9, 3), 1.2) == (4, 9)  # round(3.6)
    assert schedule_lengths(fake_trainer(100, math.inf), 1.0) == (0, 100)  # max_steps, no epochs
    with pytest.raises(ValueError, match="finite run"):
        schedule_lengths(fake_trainer(math.inf, 8), 1.0)
    # max_steps only: Lightning does not load the loader, so an epoch has no known length
    assert schedule_lengths(fake_trainer(5, math.inf, max_epochs=-1), 0.0) == (0, 5)
    with pytest.raises(ValueError, match="set trainer.max_epochs"):
        schedule_lengths(fake_trainer(5, math.inf, max_epochs=-1), 1.0)


def test_a_restored_schedule_keeps_this_fits_lengths_and_recomputes_the_rate():
    def schedule(total: int) -> WarmupCosineLR:
        _, opt = _pair()
        return WarmupCosineLR(opt, [WarmupCosine(0.1, 2, total), WarmupCosine(0.5, 2, total)])

    old = schedule(total=6)
    for _ in range(5):
        old.optimizer.step()
        old.step()
    resumed = schedule(total=12)  # resumed for twice the steps
    resumed.optimizer.load_state_dict(old.optimizer.state_dict())
    resumed.load_state_dict(old.state_dict())
    assert [fn.total_steps for fn in resumed.lr_lambdas] == [12, 12]
    want = [base * fn(5) for base, fn in zip(resumed.base_lrs, resumed.lr_lambdas, strict=True)]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == want == resumed.get_last_lr()
    same = schedule(total=6)  # nothing changed: the saved rates, bit for bit
    same.optimizer.load_state_dict(old.optimizer.state_dict())
    same.load_state_dict(old.state_dict())
    assert [g["lr"] for g in same.optimizer.param_groups] == old.get_last_lr()


RATES = dict(prompt_lr=0.05, adapter_lr=0.01, warmup_lr=1e-3)


def expected_rates(warmup: int, total: int, steps) -> list[list[float]]:
    """Prompt and adapter rates at ``steps`` by the WarmupCosine formula (as computed before
    the schedule moved into ``configure_optimizers``)."""
    bases = [RATES["prompt_lr"], RATES["adapter_lr"]]
    schedules = [WarmupCosine(RATES["warmup_lr"] / base, warmup, total) for base in bases]
    return [[b * fn(step) for b, fn in zip(bases, schedules, strict=True)] for step in steps]


class LearningRates(Callback):
    """The rate of every param group at each optimiser step (what the step actually uses)."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append([group["lr"] for group in optimizer.param_groups])


@pytest.mark.parametrize(
    ("warmup_epochs", "accumulate", "views"),
    [(0.5, 1, 0), (1.0, 2, 1)],
    ids=["half-epoch-warmup-live", "one-epoch-warmup-accumulated-cached"],
)
def test_rates_per_step_follow_the_warmup_cosine_of_the_whole_fit(
    world, tmp_path, warmup_epochs, accumulate, views
):
    """Warmup = warmup_epochs x optimiser steps per epoch, cosine to 0 over the fit's steps."""
    seed_everything(0)
    args = dict(quant_overrides=tiny_world.MINMAX, feature_views=views, **RATES)
    module = P4QModule(**tiny_world.module_args(world, warmup_epochs=warmup_epochs, **args))
    rates = LearningRates()
    max_epochs, batches_per_epoch = 3, 4  # 32 images, batch 8
    tiny_world.trainer(
        tmp_path,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        callbacks=[rates],
    ).fit(module, tiny_world.TinyDataModule(str(world["data"])))

    steps_per_epoch = batches_per_epoch / accumulate
    total = int(max_epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    assert rates.steps == expected_rates(warmup, total, range(total))
    assert rates.steps[0] == [RATES["warmup_lr"]] * 2
    assert rates.steps[warmup] == [RATES["prompt_lr"], RATES["adapter_lr"]]


def test_a_fit_resumed_for_more_epochs_stretches_the_schedule_to_the_new_length(world, tmp_path):
    """The lengths are this fit's, not the checkpoint's: resuming a 1-epoch fit for 2 epochs
    continues on the cosine of 8 steps (the rate does not stay at the 1-epoch fit's zero)."""
    seed_everything(0)
    args = tiny_world.module_args(
        world, quant_overrides=tiny_world.MINMAX, feature_views=0, warmup_epochs=0.5, **RATES
    )
    dm = tiny_world.TinyDataModule(str(world["data"]))

    def fit(max_epochs: int, callbacks: list, ckpt_path: str | None = None) -> None:
        tiny_world.trainer(
            tmp_path,
            max_epochs=max_epochs,
            enable_checkpointing=ckpt_path is None,
            limit_val_batches=0,
            callbacks=callbacks,
        ).fit(P4QModule(**args), dm, ckpt_path=ckpt_path)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(1, [checkpoint])
    rates = LearningRates()
    fit(2, [rates], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert rates.steps == expected_rates(2, 8, range(4, 8))
