"""The low-bit image-feature adapter (CLIP-Adapter shape) that P4Q trains next to the prompts."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from p4q_lightning.quant import ActivationQuantizer, GroupSpec, QuantLinear
from p4q_lightning.quant.calibrate import marking_last_batch

GROUP = "adapter"


class LowBitAdapter(nn.Module):
    """``ratio · A(z) + (1 − ratio) · z`` with ``A = Linear(d→d/r) → act → Linear(d/r→d)``.

    Both linears are :class:`QuantLinear` with the spec's ``adapter`` bits: weights are
    fake-quantized on every step (straight-through estimator) and input ranges follow an EMA
    while training, so the adapter that training ends with is already the low-bit one.

    Args:
        dim: feature width (the projected image embedding, e.g. 512 for ViT-B/32).
        reduction: hidden width is ``dim // reduction``.
        ratio: blend weight of the adapter branch (the residual keeps ``1 − ratio``).
        bias: whether the linears have a bias.
        spec: bits of the ``adapter`` group; None keeps it in float.
        act_layer: the hidden activation.
    """

    def __init__(
        self,
        dim: int,
        reduction: int = 4,
        ratio: float = 0.2,
        bias: bool = True,
        spec: GroupSpec | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"adapter reduction={reduction} leaves no hidden units for dim={dim}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"adapter ratio={ratio} must lie in [0, 1]")
        spec = spec or GroupSpec()
        hidden = dim // reduction
        self.dim, self.ratio, self.spec = dim, ratio, spec
        self.fc1 = QuantLinear(dim, hidden, spec, GROUP, bias=bias, dynamic_weights=True)
        self.act = act_layer()
        self.fc2 = QuantLinear(hidden, dim, spec, GROUP, bias=bias, dynamic_weights=True)
        for linear in (self.fc1, self.fc2):
            _init_linear(linear)
            linear.input_quantizer.mode = "ema"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return self.ratio * self.fc2(self.act(self.fc1(z))) + (1.0 - self.ratio) * z

    def input_quantizers(self) -> list[ActivationQuantizer]:
        return [m for m in self.modules() if isinstance(m, ActivationQuantizer) and m.enabled]

    @property
    def is_calibrated(self) -> bool:
        return all(bool(q.calibrated) for q in self.input_quantizers())

    @torch.no_grad()
    def calibrate(self, features: Iterable[torch.Tensor]) -> None:
        """Initialise the input ranges from image features (before training or evaluation).

        Training refines them with the EMA; without this, evaluating an untrained adapter
        would have no ranges.
        """
        quantizers = self.input_quantizers()
        if not quantizers:
            return
        was_training = self.training
        self.eval()
        for q in quantizers:
            q.start_observing()
        try:
            for z in marking_last_batch(features, quantizers):
                self(z)
        finally:
            for q in quantizers:
                q.finish_observing()
                q.mode = "ema"
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}"


def _init_linear(linear: QuantLinear) -> None:
    """``nn.Linear``'s default initialisation."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound)


def adapted_image_features(
    clip: nn.Module, adapter: nn.Module | None, images: torch.Tensor
) -> torch.Tensor:
    """image → ``clip``'s image tower → ``adapter``: the embedding [B, D] a P4Q classifier
    compares with its class embeddings (not normalised; the cosine logits normalise).

    The one definition shared by training, evaluation, the comparison and exported models.
    """
    features = clip.encode_image(images).float()
    return adapter(features) if adapter is not None else features
