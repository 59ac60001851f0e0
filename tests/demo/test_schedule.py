"""The demo teacher's schedule: a linear ramp (multiply, then divide), then cosine to zero."""

from __future__ import annotations

import math

from p4q_lightning.demo.schedule import LinearWarmupCosine


def test_linear_ramp_then_cosine_to_zero():
    fn, base = LinearWarmupCosine(warmup_steps=4, total_steps=12), 1e-3
    # the ramp multiplies before dividing (the rounding the cached teacher was trained with)
    assert [fn.lr(base, s) for s in range(4)] == [base * (s + 1) / 4 for s in range(4)]
    assert fn.lr(base, 4) == base
    assert math.isclose(fn.lr(base, 8), base / 2, rel_tol=1e-12)
    assert fn.lr(base, 12) == 0.0 and fn.lr(base, 30) == 0.0
    assert LinearWarmupCosine(0, 0).lr(base, 5) == base  # no lengths: a constant rate
