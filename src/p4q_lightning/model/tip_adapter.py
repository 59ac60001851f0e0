"""Tip-Adapter's cache: few-shot image features as keys, their one-hot labels as values.

The cache logits ``alpha * exp(-beta * (1 - f . K^T)) @ V`` are added to the template
classifier's logits (``f`` the normalised test feature). Tip-Adapter keeps K fixed (training
free); Tip-Adapter-F trains K, initialised from the cache. The keys are the mean of the student's
features over the feature cache's augmented views, normalised, as the paper averages its
augmented epochs. The keys and values stay float (a cache is data, not a quantized layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TipCache(nn.Module):
    """Keys ``[N, D]`` (a parameter; trainable for Tip-Adapter-F), values ``[N, C]`` and the
    scalars alpha and beta (buffers: the validation search sets them, checkpoints keep them)."""

    def __init__(self, alpha: float, beta: float, trainable: bool) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(0, 0), requires_grad=trainable)
        self.register_buffer("values", torch.zeros(0, 0))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.trainable = trainable

    @property
    def is_built(self) -> bool:
        return self.keys.numel() > 0

    @torch.no_grad()
    def build(self, view_features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """Keys from ``view_features`` ``[views, N, D]`` (averaged over views, normalised),
        values from ``labels`` ``[N]``."""
        if labels.numel() == 0:
            raise ValueError("Tip-Adapter's cache needs at least one training image")
        keys = F.normalize(view_features.float().mean(dim=0), dim=-1)
        # the same Parameter object: an optimiser made before the cache is built still holds it
        self.keys.data = keys.clone()
        self.values = F.one_hot(labels.long(), num_classes).float().to(keys.device)

    def set_scalars(self, alpha: float, beta: float) -> None:
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        """``f . K^T`` for normalised features ``[B, N]``."""
        return F.normalize(features.float(), dim=-1) @ self.keys.t()

    def forward(
        self, features: torch.Tensor, beta: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The cache logits ``[B, C]`` (before alpha) of image features ``[B, D]`` (with the
        cache's beta unless ``beta`` is given)."""
        return cache_logits(
            self.affinity(features), self.values, self.beta if beta is None else beta
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # a checkpoint's cache has its own shape: take it as it is
        keys, values = state_dict.get(prefix + "keys"), state_dict.get(prefix + "values")
        if keys is not None and keys.shape != self.keys.shape:
            self.keys.data = torch.empty_like(keys)
        if values is not None and values.shape != self.values.shape:
            self.values = torch.empty_like(values)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def cache_logits(
    affinity: torch.Tensor, values: torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """``exp(-beta * (1 - affinity)) @ values``."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


@torch.no_grad()
def search_alpha_beta(
    zero_shot: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    betas: torch.Tensor,
    alphas: torch.Tensor,
) -> tuple[float, float, float]:
    """The (alpha, beta) of the grids with the best top-1 of ``zero_shot + alpha * cache`` on
    the validation features, and that top-1; ties keep the first (smallest beta, then alpha),
    as Tip-Adapter's loop does with ``>``."""
    best = (-1.0, float(alphas[0]), float(betas[0]))
    for beta in betas.tolist():
        cache = cache_logits(affinity, values, beta)
        for alpha in alphas.tolist():
            acc = float(((zero_shot + alpha * cache).argmax(dim=-1) == labels).float().mean())
            if acc > best[0]:
                best = (acc, alpha, beta)
    return best[1], best[2], best[0]


def grid(maximum: float, steps: int) -> torch.Tensor:
    """Tip-Adapter's search grid ``0.1 + i * (maximum - 0.1) / steps`` for ``i < steps``."""
    return torch.tensor([0.1 + i * (maximum - 0.1) / steps for i in range(steps)])
