"""Contrastive and distillation losses, including the official code's parity expression."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from p4q_lightning.args import LossArgs
from p4q_lightning.losses import contrastive_loss, cosine_logits, distillation_loss, p4q_loss


def test_cosine_logits_are_scaled_cosines():
    img, txt = torch.randn(3, 8), torch.randn(5, 8)
    got = cosine_logits(img, txt, 100.0)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got[1, 2], 100 * F.cosine_similarity(img[1], txt[2], dim=0))


def test_kd_is_the_standard_temperature_scaled_cross_entropy():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    for temp in (1.0, 2.0):
        want = -(F.softmax(t / temp, -1) * F.log_softmax(s / temp, -1)).sum(-1).mean() * temp**2
        torch.testing.assert_close(distillation_loss(s, t, "kd", temp), want)
    # minimised (over student logits) by matching the teacher
    assert distillation_loss(t, t) < distillation_loss(s, t)


def test_official_kind_is_the_official_expression_verbatim():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    want = F.cross_entropy(F.softmax(t, dim=-1), F.softmax(s, dim=-1))
    torch.testing.assert_close(distillation_loss(s, t, "official"), want)
    assert not torch.allclose(distillation_loss(s, t, "official"), distillation_loss(s, t, "kd"))


@pytest.mark.parametrize("kind", ["kd", "official"])
def test_teacher_gets_no_gradient(kind):
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    distillation_loss(s, t, kind).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_p4q_loss_weights_and_parts():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    parts = p4q_loss(s, y, t, LossArgs(ce_weight=0.5, distill_weight=2.0))
    torch.testing.assert_close(parts["ce"], contrastive_loss(s, y))
    torch.testing.assert_close(parts["loss"], 0.5 * parts["ce"] + 2.0 * parts["distill"])
    assert set(p4q_loss(s, y)) == {"ce", "loss"}


def test_bad_kind_and_temperature():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kd"):
        distillation_loss(s, s, "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        distillation_loss(s, s, "kd", 0.0)
