"""A small ONNX graph builder: unique names, initializers from tensors, nodes, integer codes.

The exporter writes the graph op by op instead of tracing, so every quantized layer becomes
exactly the QuantizeLinear/DequantizeLinear pattern onnxruntime fuses into integer kernels,
and 4-bit weights can be stored as ONNX ``INT4`` (opset 21), which the tracing exporters do
not produce.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

#: opset 21: INT4 tensors, per-axis Q/DQ, Gelu (20) and LayerNormalization (17)
OPSET = 21
#: the IR version that knows INT4 (onnxruntime >= 1.18 reads it)
IR_VERSION = 10


def as_numpy(value: torch.Tensor | np.ndarray | float | int, dtype: Any = None) -> np.ndarray:
    """A detached CPU numpy copy (float tensors as float32 unless ``dtype`` says otherwise)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and dtype is None:
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if dtype is not None:
        array = array.astype(dtype)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


class GraphBuilder:
    """Collects nodes and initializers under unique names, then makes a ``ModelProto``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: Counter[str] = Counter()
        self._scalars: dict[tuple[str, bytes], str] = {}

    def name(self, hint: str) -> str:
        """``hint``, or ``hint_<n>`` when it is taken."""
        self._used[hint] += 1
        count = self._used[hint]
        return hint if count == 1 else f"{hint}_{count - 1}"

    def const(
        self, hint: str, value: torch.Tensor | np.ndarray | float | int, dtype: Any = None
    ) -> str:
        """An initializer holding ``value``; small constants of equal value are shared."""
        array = as_numpy(value, dtype)
        key = (str(array.dtype) + str(array.shape), array.tobytes())
        if array.size <= 16 and key in self._scalars:
            return self._scalars[key]
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        if array.size <= 16:
            self._scalars[key] = name
        return name

    def ints(self, hint: str, values: Sequence[int]) -> str:
        """An int64 vector initializer (shapes, axes, slice bounds)."""
        return self.const(hint, np.asarray(values, dtype=np.int64))

    def int_codes(self, hint: str, codes: torch.Tensor, bits: int) -> str:
        """Signed integer weight codes stored as ``INT4`` (<= 4 bits) or ``INT8``; returns an
        int8 tensor (4-bit codes pass through a Cast that onnxruntime folds at load)."""
        array = codes.detach().cpu().to(torch.int8).numpy()
        if bits > 4:
            return self.const(hint, array)
        import ml_dtypes  # onnx's own dependency for INT4 tensors

        name = self.name(hint + "_int4")
        self.initializers.append(numpy_helper.from_array(array.astype(ml_dtypes.int4), name))
        return self.op("Cast", [name], hint, to=TensorProto.INT8)

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        """Append one node with one output; returns the output's name."""
        return self.op_multi(op_type, inputs, 1, hint, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: int,
        hint: str | None = None,
        **attrs: Any,
    ) -> list[str]:
        """Append one node with ``outputs`` outputs; returns their names."""
        base = hint or op_type.lower()
        names = [self.name(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        node_name = self.name(f"{op_type}:{base}")
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        return names

    def identity(self, source: str, name: str) -> str:
        """Give ``source`` the graph-output name ``name``."""
        self.nodes.append(
            helper.make_node("Identity", [source], [name], name=self.name(f"out:{name}"))
        )
        return name

    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        metadata: dict[str, str],
        doc: str = "",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, list(inputs), list(outputs), self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="p4q_lightning",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata)
        return model
