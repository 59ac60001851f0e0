"""Export-time forms of the quantized layers: each module written as ONNX nodes.

Read from the modules' public attributes (``weight``, ``bias``, ``input_quantizer``,
``weight_quantizer``, attention's ``in_proj``/``out_proj`` leaves and q/k/v/probability
quantizers), never from their forward code, so what is exported is the arithmetic the
fake-quant forward carries out:

- a quantized weight is an integer initializer (``INT8``, or ``INT4`` for <= 4 bits) with its
  per-output-channel scale, behind ``DequantizeLinear``;
- a quantized activation is ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8, the calibrated
  scale and zero point); below 8 bits a ``Clip`` to the grid's range comes first, since
  ``QuantizeLinear`` saturates at 255, not at 2^bits - 1. Per-channel ranges (``p4q-official``)
  are written as their fake-quant arithmetic with per-channel constants (exact, but no integer
  GEMM takes per-channel input scales: those layers run in float);
- ``DQ(activation) -> MatMul <- DQ(weight)`` is the pattern onnxruntime replaces with an
  integer GEMM (``MatMulIntegerToFloat``), the bias is a separate ``Add``.

With ``quantized=False`` every quantizer is ignored and the float weights are written: the
float graph of the same architecture (what the benchmark compares against).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from p4q_lightning.export.onnx.graph import GraphBuilder
from p4q_lightning.quant import (
    ActivationQuantizer,
    Log2Quantizer,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
    WeightQuantizer,
)


class UnsupportedForOnnx(ValueError):
    """The model holds a layer or setting the ONNX export has no exact form for."""


class LayerWriter:
    """Writes open_clip transformer pieces (float or quantized) into a :class:`GraphBuilder`."""

    def __init__(self, graph: GraphBuilder, quantized: bool = True) -> None:
        self.g = graph
        self.quantized = quantized
        #: float weights written, and activations quantized per channel (run in float)
        self.counts = {"float_weights": 0, "per_channel_activations": 0}

    # ------------------------------------------------------------------ quantizers
    def activation(self, x: str, q: nn.Module | None, hint: str) -> str:
        """``x`` through quantizer ``q`` (fake quantization as Q/DQ); ``x`` when it is off."""
        if not self.quantized or q is None or not getattr(q, "enabled", False):
            return x
        if isinstance(q, Log2Quantizer):
            return self._log2(x, q.bits, hint)
        if not isinstance(q, ActivationQuantizer):
            raise UnsupportedForOnnx(f"{hint}: no ONNX form for quantizer {type(q).__name__}")
        if not bool(q.calibrated):
            raise UnsupportedForOnnx(
                f"{hint}: activation quantizer is not calibrated; calibrate the student first"
            )
        qmax = 2**q.bits - 1
        scale = q.scale.detach().float().cpu().reshape(-1)
        zero = q.zero_point.detach().cpu().reshape(-1).to(torch.int64)
        if bool((zero < 0).any()) or bool((zero > qmax).any()):
            raise UnsupportedForOnnx(f"{hint}: zero point outside the {q.bits}-bit grid")
        if q.per_channel:
            return self._per_channel(x, q, scale, zero, qmax, hint)
        s = self.g.const(f"{hint}.scale", scale[0].reshape(()))
        z = self.g.const(f"{hint}.zero_point", zero[0].reshape(()).numpy().astype("uint8"))
        if q.bits < 8:
            lo = self.g.const(f"{hint}.lo", ((0 - zero[0]) * scale[0]).reshape(()))
            hi = self.g.const(f"{hint}.hi", ((qmax - zero[0]) * scale[0]).reshape(()))
            x = self.g.op("Clip", [x, lo, hi], f"{hint}.clip")
        xq = self.g.op("QuantizeLinear", [x, s, z], f"{hint}.q")
        return self.g.op("DequantizeLinear", [xq, s, z], f"{hint}.dq")

    def _per_channel(
        self,
        x: str,
        q: ActivationQuantizer,
        scale: torch.Tensor,
        zero: torch.Tensor,
        qmax: int,
        hint: str,
    ) -> str:
        """Per-channel fake quantization as its own arithmetic, ``clamp(round(x / s), -z,
        qmax - z) * s`` with per-channel constants: exact, in float kernels.

        Not per-axis Q/DQ: onnxruntime 1.32 fuses a per-axis activation DQ into
        ``MatMulIntegerToFloat`` anyway and then fails at run time (it takes one input zero
        point), and no integer GEMM could use per-channel input scales.
        """
        self.counts["per_channel_activations"] += 1
        axis = q.channel_axis
        if axis == -1:
            shape = [scale.numel()]
        elif axis == 1:  # NCHW pixels: [C, 1, 1]
            shape = [scale.numel(), 1, 1]
        else:
            raise UnsupportedForOnnx(f"{hint}: per-channel axis {axis} is not supported")
        g = self.g
        codes = g.op(
            "Round",
            [g.op("Mul", [x, g.const(f"{hint}.inv_scale", (1 / scale).reshape(shape))])],
            f"{hint}.round",
        )
        lo = g.const(f"{hint}.lo", (0 - zero).float().reshape(shape))
        hi = g.const(f"{hint}.hi", (qmax - zero).float().reshape(shape))
        codes = g.op("Min", [g.op("Max", [codes, lo]), hi], f"{hint}.codes")
        return g.op("Mul", [codes, g.const(f"{hint}.scale", scale.reshape(shape))], f"{hint}.fq")

    def _log2(self, x: str, bits: int, hint: str) -> str:
        """Log2 quantizer of probabilities: 2^-round(-log2 p), 0 below the smallest level."""
        g = self.g
        code = g.op(
            "Round",
            [g.op("Mul", [g.op("Log", [x]), g.const("neg_inv_ln2", -1 / math.log(2))])],
            f"{hint}.code",
        )
        keep = g.op("Less", [code, g.const(f"{hint}.levels", float(2**bits - 1))])
        level = g.op("Pow", [g.const("two", 2.0), g.op("Neg", [code])])
        return g.op("Where", [keep, level, g.const("zero", 0.0)], f"{hint}.log2")

    def weight_codes(
        self, weight: torch.Tensor, wq: WeightQuantizer, frozen: bool, hint: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, per-channel scale) of the weight the fake-quant layer multiplies with."""
        w = weight.detach().float().cpu()
        shape = (-1,) + (1,) * (w.dim() - 1)
        if wq.dynamic:  # trained weights (the adapter): quantized by every forward, so now
            scale = wq.minmax_scale(w).float()
        else:
            if not frozen:
                raise UnsupportedForOnnx(
                    f"{hint}: weights are not quantized yet; calibrate the student first"
                )
            scale = wq.scale.detach().float().cpu()
        codes = torch.round(w / scale.view(shape)).clamp(wq.qmin, wq.qmax)
        if not wq.dynamic:
            err = (codes * scale.view(shape) - w).abs().max()
            if float(err) > 1e-6 * float(w.abs().max().clamp_min(1e-12)):
                raise UnsupportedForOnnx(
                    f"{hint}: stored weight is not on its {wq.bits}-bit grid (max error "
                    f"{float(err):.3g}); re-run calibration"
                )
        return codes.to(torch.int8), scale

    def matrix(
        self,
        weight: torch.Tensor,
        wq: WeightQuantizer | None,
        frozen: bool,
        hint: str,
        integer_input: bool = True,
    ) -> str:
        """The ``[in, out]`` right operand of ``x @ W^T``: float, or the integer codes dequantized.

        With a quantized input it is ``DequantizeLinear`` (per output channel), which onnxruntime
        fuses with the input's Q/DQ into an integer GEMM. With a float input (``p4q-448``'s
        ``attn_out``) it is ``Cast`` and ``Mul`` by the scales, which onnxruntime folds into a
        float weight when the session loads: a DQ there would be rewritten into
        ``MatMulNBits``, which quantizes the float input to int8 on the fly and so changes the
        result.
        """
        if not self.quantized or wq is None or not wq.enabled:
            self.counts["float_weights"] += 1
            return self.g.const(hint, weight.detach().float().t().contiguous())
        codes, scale = self.weight_codes(weight, wq, frozen, hint)
        stored = self.g.int_codes(hint, codes.t().contiguous(), wq.bits)
        if integer_input:
            return self.g.op(
                "DequantizeLinear",
                [stored, self.g.const(f"{hint}.scale", scale)],
                f"{hint}.dq",
                axis=1,
            )
        as_float = self.g.op("Cast", [stored], f"{hint}.float", to=1)
        return self.g.op(
            "Mul", [as_float, self.g.const(f"{hint}.scale", scale)], f"{hint}.dequantized"
        )

    # ------------------------------------------------------------------ layers
    def linear(self, x: str, layer: nn.Module, hint: str) -> str:
        """``nn.Linear`` or :class:`QuantLinear` on the last axis of ``x``."""
        if isinstance(layer, QuantLinear):
            x = self.activation(x, layer.input_quantizer, f"{hint}.input")
            integer_input = self.quantized and layer.input_quantizer.enabled
            w = self.matrix(
                layer.weight,
                layer.weight_quantizer,
                _frozen(layer),
                f"{hint}.weight",
                integer_input and not layer.input_quantizer.per_channel,
            )
        elif isinstance(layer, nn.Linear):
            w = self.matrix(layer.weight, None, True, f"{hint}.weight")
        else:
            raise UnsupportedForOnnx(
                f"{hint}: {type(layer).__name__} has no ONNX form (export the fake-quant model: "
                "load_lowbit(path) without int8=True)"
            )
        y = self.g.op("MatMul", [x, w], f"{hint}.matmul")
        if layer.bias is not None:
            y = self.g.op("Add", [y, self.g.const(f"{hint}.bias", layer.bias)], hint)
        return y

    def linear_weights(
        self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, hint: str
    ) -> str:
        """A float ``x @ weight^T + bias`` from bare parameters (float attention's in_proj)."""
        y = self.g.op(
            "MatMul", [x, self.matrix(weight, None, True, f"{hint}.weight")], f"{hint}.matmul"
        )
        return (
            y if bias is None else self.g.op("Add", [y, self.g.const(f"{hint}.bias", bias)], hint)
        )

    def patch_embed(self, x: str, conv: nn.Module, size: tuple[int, int], hint: str) -> str:
        """The patch embedding of images [B, 3, H, W] -> tokens [B, patches, width].

        open_clip's ``conv1`` has stride = kernel = patch and no padding, so it is written as
        patches cut by Reshape/Transpose and one ``MatMul``: with a quantized input that is an
        integer GEMM in onnxruntime, where a ``Conv`` without an output Q stays in float.
        """
        if isinstance(conv, QuantConv2d):
            x = self.activation(x, conv.input_quantizer, f"{hint}.input")
            wq, frozen, act = conv.weight_quantizer, _frozen(conv), conv.input_quantizer
        elif isinstance(conv, nn.Conv2d):
            wq, frozen, act = None, True, None
        else:
            raise UnsupportedForOnnx(f"{hint}: patch embedding {type(conv).__name__} unsupported")
        out_ch, in_ch, kh, kw = conv.weight.shape
        plain = (
            tuple(conv.stride) == (kh, kw)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and not isinstance(conv.padding, str)
            and tuple(conv.padding) == (0, 0)
            and size[0] % kh == 0
            and size[1] % kw == 0
        )
        if not plain:
            raise UnsupportedForOnnx(
                f"{hint}: only non-overlapping patch convolutions (stride = kernel, no padding) "
                "are supported"
            )
        g = self.g
        gh, gw = size[0] // kh, size[1] // kw
        patches = g.op("Reshape", [x, g.ints(f"{hint}.grid", [0, in_ch, gh, kh, gw, kw])])
        patches = g.op("Transpose", [patches], perm=[0, 2, 4, 1, 3, 5])  # [B, gh, gw, C, kh, kw]
        patches = g.op(
            "Reshape",
            [patches, g.ints(f"{hint}.flat", [0, gh * gw, in_ch * kh * kw])],
            f"{hint}.patches",
        )
        integer_input = act is not None and self.quantized and act.enabled and not act.per_channel
        w = self.matrix(
            conv.weight.reshape(out_ch, -1), wq, frozen, f"{hint}.weight", integer_input
        )
        y = g.op("MatMul", [patches, w], f"{hint}.matmul")
        if conv.bias is not None:
            y = g.op("Add", [y, g.const(f"{hint}.bias", conv.bias)], hint)
        return y

    def embedding_gather(self, ids: str, table: nn.Module, hint: str) -> str:
        """Rows of the token table for ``ids``; a quantized table gathers codes, then scales."""
        if isinstance(table, QuantEmbedding) and self.quantized and table.weight_quantizer.enabled:
            wq = table.weight_quantizer
            codes, scale = self.weight_codes(table.weight, wq, _frozen(table), f"{hint}.weight")
            stored = self.g.int_codes(f"{hint}.weight", codes, wq.bits)
            rows = self.g.op("Cast", [self.g.op("Gather", [stored, ids])], to=1)
            row_scale = self.g.op(
                "Unsqueeze",
                [
                    self.g.op("Gather", [self.g.const(f"{hint}.scale", scale), ids]),
                    self.g.ints("axis_last", [-1]),
                ],
            )
            return self.g.op("Mul", [rows, row_scale], hint)
        if isinstance(table, (nn.Embedding, QuantEmbedding)):
            self.counts["float_weights"] += 1
            return self.g.op("Gather", [self.g.const(f"{hint}.weight", table.weight), ids], hint)
        raise UnsupportedForOnnx(f"{hint}: token embedding {type(table).__name__} unsupported")

    def layer_norm(self, x: str, ln: nn.Module, hint: str) -> str:
        if isinstance(ln, nn.Identity):
            return x
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            raise UnsupportedForOnnx(f"{hint}: {type(ln).__name__} is not a last-axis LayerNorm")
        width = ln.normalized_shape[0]
        weight = ln.weight if ln.weight is not None else torch.ones(width)
        inputs = [x, self.g.const(f"{hint}.weight", weight)]
        if ln.bias is not None:
            inputs.append(self.g.const(f"{hint}.bias", ln.bias))
        return self.g.op("LayerNormalization", inputs, hint, axis=-1, epsilon=float(ln.eps))

    def activation_fn(self, x: str, act: nn.Module, hint: str) -> str:
        """GELU (exact or tanh), open_clip's QuickGELU, or ReLU."""
        if isinstance(act, nn.GELU):
            return self.g.op("Gelu", [x], hint, approximate=act.approximate)
        if type(act).__name__ == "QuickGELU":
            return self.g.op(
                "Mul",
                [
                    x,
                    self.g.op(
                        "Sigmoid", [self.g.op("Mul", [x, self.g.const("quick_gelu", 1.702)])]
                    ),
                ],
                hint,
            )
        if isinstance(act, nn.ReLU):
            return self.g.op("Relu", [x], hint)
        if isinstance(act, nn.Identity):
            return x
        raise UnsupportedForOnnx(f"{hint}: activation {type(act).__name__} has no ONNX form here")

    def layer_scale(self, x: str, ls: nn.Module, hint: str) -> str:
        if isinstance(ls, nn.Identity):
            return x
        gamma = getattr(ls, "gamma", None)
        if gamma is None:
            raise UnsupportedForOnnx(f"{hint}: {type(ls).__name__} is not a LayerScale")
        return self.g.op("Mul", [x, self.g.const(f"{hint}.gamma", gamma)], hint)

    def attention(self, x: str, attn: nn.Module, mask: str | None, hint: str) -> str:
        """Self-attention of batch-first ``x`` [B, L, E] (quantized or float attention)."""
        g = self.g
        quantized_attn = isinstance(attn, QuantMultiheadAttention)
        if quantized_attn:
            embed, heads = attn.embed_dim, attn.num_heads
            qkv = self.linear(x, attn.in_proj, f"{hint}.in_proj")
        elif isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None:
            embed, heads = attn.embed_dim, attn.num_heads
            qkv = self.linear_weights(x, attn.in_proj_weight, attn.in_proj_bias, f"{hint}.in_proj")
        else:
            raise UnsupportedForOnnx(f"{hint}: attention {type(attn).__name__} unsupported")
        head_dim = embed // heads
        q, k, v = g.op_multi("Split", [qkv], 3, f"{hint}.qkv", axis=-1, num_outputs=3)
        split = g.ints(f"heads_{heads}x{head_dim}", [0, 0, heads, head_dim])

        def heads_of(t: str, perm: list[int], name: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split])], f"{hint}.{name}", perm=perm)

        q = heads_of(q, [0, 2, 1, 3], "q")
        k = heads_of(k, [0, 2, 3, 1], "k_t")  # [B, H, d, L]: k transposed for q @ k^T
        v = heads_of(v, [0, 2, 1, 3], "v")
        internals = quantized_attn and attn.internals_quantized
        if internals:
            q = self.activation(q, attn.q_quantizer, f"{hint}.q_quant")
            k = self.activation(k, attn.k_quantizer, f"{hint}.k_quant")
            v = self.activation(v, attn.v_quantizer, f"{hint}.v_quant")
        scores = g.op("MatMul", [q, k], f"{hint}.scores")
        scores = g.op("Mul", [scores, g.const(f"attn_scale_{head_dim}", head_dim**-0.5)])
        if mask is not None:
            scores = g.op("Add", [scores, mask], f"{hint}.masked")
        probs = g.op("Softmax", [scores], f"{hint}.probs", axis=-1)
        if internals:
            probs = self.activation(probs, attn.probs_quantizer, f"{hint}.probs_quant")
        out = g.op("MatMul", [probs, v], f"{hint}.context")
        out = g.op(
            "Reshape",
            [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.ints("merge_heads", [0, 0, -1])],
        )
        return self.linear(out, attn.out_proj, f"{hint}.out_proj")

    def block(self, x: str, block: nn.Module, mask: str | None, hint: str) -> str:
        """open_clip's ``ResidualAttentionBlock``: pre-norm attention and MLP with residuals."""
        for part in ("ln_1", "attn", "ln_2", "mlp"):
            if not hasattr(block, part):
                raise UnsupportedForOnnx(
                    f"{hint}: {type(block).__name__} is not a ResidualAttentionBlock"
                )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedForOnnx(f"{hint}: cross-attention blocks are not supported")
        h = self.attention(
            self.layer_norm(x, block.ln_1, f"{hint}.ln_1"), block.attn, mask, f"{hint}.attn"
        )
        x = self.g.op(
            "Add",
            [x, self.layer_scale(h, getattr(block, "ls_1", nn.Identity()), f"{hint}.ls_1")],
            f"{hint}.res1",
        )
        mlp = block.mlp
        h = self.layer_norm(x, block.ln_2, f"{hint}.ln_2")
        h = self.linear(h, mlp.c_fc, f"{hint}.mlp.c_fc")
        h = self.activation_fn(h, mlp.gelu, f"{hint}.mlp.gelu")
        h = self.linear(h, mlp.c_proj, f"{hint}.mlp.c_proj")
        return self.g.op(
            "Add",
            [x, self.layer_scale(h, getattr(block, "ls_2", nn.Identity()), f"{hint}.ls_2")],
            f"{hint}.res2",
        )

    def transformer(self, x: str, transformer: nn.Module, mask: str | None, hint: str) -> str:
        for i, block in enumerate(transformer.resblocks):
            x = self.block(x, block, mask, f"{hint}.{i}")
        return x

    def normalize(self, x: str, hint: str) -> str:
        """``F.normalize(x, dim=-1)``: x / max(||x||, 1e-12)."""
        norm = self.g.op(
            "ReduceL2", [x, self.g.ints("axis_last", [-1])], f"{hint}.norm", keepdims=1
        )
        norm = self.g.op("Max", [norm, self.g.const("norm_eps", 1e-12)])
        return self.g.op("Div", [x, norm], hint)


def _frozen(module: nn.Module) -> bool:
    """Whether a quantized layer's weight is stored on its grid (set by calibration)."""
    return bool(getattr(module, "weights_frozen", False))
