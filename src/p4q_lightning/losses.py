"""P4Q's losses: contrastive cross-entropy on cosine logits, and distillation from the teacher."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from p4q_lightning.args import LossArgs

DistillKind = Literal["kd", "official"]


def cosine_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """``scale · cos(image_i, text_k)`` for every image/class pair ([B, n_cls])."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return scale * image @ text.t()


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the image-to-class cosine logits against the labels."""
    return F.cross_entropy(logits, labels)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: DistillKind = "kd",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Distillation from the float teacher's logits (treated as constants).

    ``kd``: the standard ``−Σ softmax(t/T) · log_softmax(s/T) · T²`` (batch mean).
    ``official``: the official P4Q code's ``F.cross_entropy(softmax(t), softmax(s))`` verbatim —
    teacher probabilities in the logits slot, student probabilities as the soft target — kept
    for parity runs only (``temperature`` does not apply).
    """
    teacher_logits = teacher_logits.detach().float()
    student_logits = student_logits.float()
    if kind == "kd":
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        t = F.softmax(teacher_logits / temperature, dim=-1)
        log_s = F.log_softmax(student_logits / temperature, dim=-1)
        return -(t * log_s).sum(dim=-1).mean() * temperature**2
    if kind == "official":
        return F.cross_entropy(teacher_logits.softmax(dim=-1), student_logits.softmax(dim=-1))
    raise ValueError(
        f"unknown distillation kind {kind!r}: use 'kd' (standard) or 'official' (parity)"
    )


def p4q_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    loss: LossArgs | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted sum ``ce_weight · CE + distill_weight · L_dist`` and its parts, with the
    weights, distillation kind and temperature of the ``loss`` options (defaults: None)."""
    loss = loss or LossArgs()
    ce = contrastive_loss(student_logits, labels)
    parts = {"ce": ce}
    total = loss.ce_weight * ce
    if teacher_logits is not None and loss.distill_weight:
        dist = distillation_loss(
            student_logits, teacher_logits, loss.distill_kind, loss.temperature
        )
        parts["distill"] = dist
        total = total + loss.distill_weight * dist
    parts["loss"] = total
    return parts


def kgcoop_loss(learned: torch.Tensor, handwritten: torch.Tensor) -> torch.Tensor:
    """KgCoOp's regulariser: ``mean_k (1 - cos(w_k, w0_k))`` between the learned prompt's class
    embeddings and the hand-written prompt's (constants), i.e. half the mean squared distance
    of the normalised embeddings, as KgCoOp's code computes it."""
    learned = F.normalize(learned.float(), dim=-1)
    handwritten = F.normalize(handwritten.detach().float(), dim=-1)
    return (1.0 - (learned * handwritten).sum(dim=-1)).mean()
