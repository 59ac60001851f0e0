"""The demo teacher's learning-rate schedule: a linear ramp, then cosine decay to zero."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinearWarmupCosine:
    """``base_lr * (step + 1) / warmup_steps`` for ``warmup_steps``, then a cosine to 0 at
    ``total_steps``. The ramp multiplies before dividing: the rounding the cached teacher
    weights were trained with (a different order changes them, and the demo's numbers)."""

    warmup_steps: int
    total_steps: int

    def lr(self, base_lr: float, step: int) -> float:
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return base_lr
        progress = min(1.0, (step - self.warmup_steps) / span)
        return base_lr * (0.5 * (1.0 + math.cos(math.pi * progress)))
