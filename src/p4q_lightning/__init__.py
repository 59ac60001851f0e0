"""p4q_lightning: P4Q (prompt learning for quantized CLIP) as PyTorch Lightning modules.

The top level stays light (torch + open_clip); Lightning pieces import on first use.
"""

from __future__ import annotations

from typing import Any

from p4q_lightning.model.clip import load_clip
from p4q_lightning.quant import QuantSpec, calibrate, get_spec, is_calibrated, quantize

__version__ = "0.1.0"

_LAZY = {
    "P4QModule": "p4q_lightning.module",
    "FewShotDataModule": "p4q_lightning.data",
    "load_lowbit": "p4q_lightning.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p4q_lightning' has no attribute {name!r}")


__all__ = ["QuantSpec", "calibrate", "get_spec", "is_calibrated", "load_clip", "quantize", *_LAZY]
