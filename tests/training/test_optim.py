"""The combined prompt/adapter optimiser matches torch's SGD and AdamW; the warmup-cosine
schedule."""

from __future__ import annotations

import math

import pytest
import torch

from p4q_lightning.training.optim import PromptAdapterOptimizer, WarmupCosine


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
    assert WarmupCosine()(0) == 1.0  # before the trainer fills in the lengths
