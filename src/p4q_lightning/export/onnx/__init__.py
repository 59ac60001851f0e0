"""ONNX export of a trained P4Q classifier: integer weights, onnxruntime integer kernels.

``export_onnx(model, "model.onnx")`` writes one graph from preprocessed images to class
logits (``p4q export CKPT --format onnx``). The graph is written op by op
(:mod:`~p4q_lightning.export.onnx.layers`), not traced. Needs the optional packages
``onnx`` and ``onnxruntime`` (``pip install 'p4q_lightning[onnx]'``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

#: what to run when the optional packages are missing
INSTALL = "pip install 'p4q_lightning[onnx]'  (or: pip install onnx onnxruntime)"


class OnnxUnavailableError(ImportError):
    """onnx or onnxruntime is not installed."""


def require_onnx() -> None:
    """Fail in one line, naming the install command, when the optional packages are missing."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxUnavailableError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed: {INSTALL}"
        )


def export_onnx(model: Any, path: Any, **kwargs: Any) -> Any:
    """See :func:`p4q_lightning.export.onnx.writer.export_onnx` (imported on first use, so
    this package imports without the optional dependencies)."""
    require_onnx()
    from p4q_lightning.export.onnx.writer import export_onnx as write

    return write(model, path, **kwargs)


__all__ = ["INSTALL", "OnnxUnavailableError", "export_onnx", "require_onnx"]
