"""p4q_lightning: P4Q (prompt learning for quantized CLIP) as PyTorch Lightning modules.

Importing the package is light (no torch): every public name imports its module on first use,
so the command line answers ``--help`` and ``--version`` at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The demo's pretrained tags (``synthetic[:seed]``) are resolvable wherever the package is used;
# this imports only the registry and the name parser (no torch).
import p4q_lightning.demo  # noqa: E402,F401

_LAZY = {
    "load_clip": "p4q_lightning.model.clip",
    "QuantSpec": "p4q_lightning.quant",
    "calibrate": "p4q_lightning.quant",
    "get_spec": "p4q_lightning.quant",
    "is_calibrated": "p4q_lightning.quant",
    "quantize": "p4q_lightning.quant",
    "P4QModule": "p4q_lightning.module",
    "P4QClassifier": "p4q_lightning.model.classifier",
    "FewShotDataModule": "p4q_lightning.data",
    "load_lowbit": "p4q_lightning.export",
}

if TYPE_CHECKING:
    from p4q_lightning.data import FewShotDataModule
    from p4q_lightning.export import load_lowbit
    from p4q_lightning.model.classifier import P4QClassifier
    from p4q_lightning.model.clip import load_clip
    from p4q_lightning.module import P4QModule
    from p4q_lightning.quant import QuantSpec, calibrate, get_spec, is_calibrated, quantize


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p4q_lightning' has no attribute {name!r}")


__all__ = [
    "FewShotDataModule",
    "P4QClassifier",
    "P4QModule",
    "QuantSpec",
    "calibrate",
    "get_spec",
    "is_calibrated",
    "load_clip",
    "load_lowbit",
    "quantize",
]
