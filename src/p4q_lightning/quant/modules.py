"""Quantized drop-in replacements for the layers of an open_clip transformer.

Each keeps the original parameter names (``weight``, ``bias``, ``out_proj.weight``...) so
open_clip state dicts load unchanged (attention's packed ``in_proj_weight``/``in_proj_bias``
become its ``in_proj`` leaf's ``weight``/``bias``; a load pre-hook renames them), and adds
quantizers as children. With every quantizer disabled each module computes what the float
layer computes. Weights are quantized once by :meth:`freeze_weights` (called by calibration)
and stored on the grid, so no forward pass re-quantizes a frozen weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.legacy import rename_attention_keys
from p4q_lightning.quant.attention import (
    AttentionInternals,
    AttentionLayer,
    attend,
    float_attention_layer,
)
from p4q_lightning.quant.held_codes import HeldCodes, hold_codes
from p4q_lightning.quant.quantizer import (
    ActivationQuantizer,
    CachedBufferState,
    Log2Quantizer,
    WeightQuantizer,
)
from p4q_lightning.quant.spec import GroupSpec


def _act_quantizer(spec: GroupSpec, channels: int, channel_axis: int = -1) -> ActivationQuantizer:
    return ActivationQuantizer(
        spec.a_bits,
        spec.a_observer,
        spec.a_per_channel,
        channels,
        spec.percentile,
        channel_axis=channel_axis,
        grid=spec.a_grid,
        score_on=spec.a_score_on,
    )


def _weight_quantizer(spec: GroupSpec, channels: int, dynamic: bool = False) -> WeightQuantizer:
    return WeightQuantizer(
        spec.w_bits, channels, spec.w_observer, spec.percentile, dynamic, grid=spec.w_grid
    )


class QuantizedWeightMixin:
    """Shared weight handling: quantize the stored weight once, in place."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    weights_frozen: torch.Tensor
    buffer_flag: Callable[[str], bool]

    @torch.no_grad()
    def freeze_weights(self) -> None:
        wq = self.weight_quantizer
        if not wq.enabled or wq.dynamic or bool(self.weights_frozen):
            return
        wq.calibrate_from(self.weight)
        # + 0.0 turns the -0.0 of negative values rounded to code 0 into the grid's 0, so the
        # stored weight is exactly codes * scale, bit for bit (see held_codes)
        self.weight.data.copy_(wq(self.weight.data).add_(0.0))
        self.weights_frozen.fill_(True)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer uses it: stored on the grid once frozen, never re-quantized."""
        wq = self.weight_quantizer
        if not wq.enabled or self.buffer_flag("weights_frozen"):
            return self.weight
        return wq(self.weight)


class QuantLinear(QuantizedWeightMixin, CachedBufferState):
    """``nn.Linear`` with a quantized input activation and a quantized weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: GroupSpec,
        group: str,
        bias: bool = True,
        dynamic_weights: bool = False,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_quantizer = _act_quantizer(spec, in_features)
        self.weight_quantizer = _weight_quantizer(spec, out_features, dynamic=dynamic_weights)
        self.register_buffer("weights_frozen", torch.tensor(False))
        #: the frozen weight as integer codes while :meth:`hold_as_codes` holds it that way
        self.held: HeldCodes | None = None
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, for layers built directly (e.g. the adapter)."""
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = 1 / self.in_features**0.5 if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: GroupSpec, group: str) -> QuantLinear:
        """Wrap ``linear``, sharing (not copying) its weight and bias parameters."""
        # the throwaway initialisation draws from the global RNG, as seeded runs always did
        q = cls(linear.in_features, linear.out_features, spec, group, bias=False)
        return q.use_parameters(linear.weight, linear.bias)

    @classmethod
    def sharing(
        cls, weight: nn.Parameter, bias: nn.Parameter | None, spec: GroupSpec, group: str
    ) -> QuantLinear:
        """A layer over existing ``weight`` ``[out, in]`` and ``bias`` parameters (not copies),
        e.g. attention's packed q/k/v; draws nothing from the RNG."""
        out_features, in_features = weight.shape
        q = cls(in_features, out_features, spec, group, bias=False, init=False)
        return q.use_parameters(weight, bias)

    def use_parameters(self, weight: nn.Parameter, bias: nn.Parameter | None) -> QuantLinear:
        """Compute with these parameters (shared, not copied); returns ``self``."""
        self.weight, self.bias = weight, bias
        return self.to(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_scaled(x, 1.0)

    def forward_scaled(self, x: torch.Tensor, pre_scale: float) -> torch.Tensor:
        """The layer applied to ``x * pre_scale``, with the factor folded into the matmul.

        Attention hands over its un-dequantized ``probs @ v`` this way; the input quantizer's
        scale is folded the same way (one ``addmm`` with ``alpha``), which saves elementwise
        passes over the activation.
        """
        codes, scale = self.input_quantizer.centered_codes(x, pre_scale)
        if self.held is None:
            return scaled_linear(codes, self.quantized_weight(), self.bias, scale)
        with self.held.weight() as weight:
            return scaled_linear(codes, weight, self.bias, scale)

    def hold_as_codes(self) -> bool:
        """Hold the frozen quantized weight as integer codes and scales and drop its float
        storage (the parameter object stays, empty); False, and nothing changes, when the
        weight is not frozen on a static grid, trains, or its codes do not reproduce it bit
        for bit (:mod:`~p4q_lightning.quant.held_codes`)."""
        wq = self.weight_quantizer
        if self.held is not None:
            return True
        if not wq.enabled or wq.dynamic or self.weight.requires_grad:
            return False
        if not self.buffer_flag("weights_frozen"):
            return False
        held = hold_codes(self.weight.detach(), wq.scale)
        if held is None:
            return False
        self.held = held
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        return True

    def restore_float(self) -> None:
        """Put the float weight back (bitwise the one held) and drop the codes."""
        if self.held is not None:
            self.weight.data = self.held.dequantize()
            self.held = None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, group={self.group}"


def scaled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """``F.linear(x * alpha, weight, bias)`` as one ``addmm`` (alpha scales the product)."""
    if alpha == 1.0:
        return F.linear(x, weight, bias)
    if bias is None:
        return F.linear(x, weight) * alpha
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t(), alpha=alpha)
    return out.view(*x.shape[:-1], weight.shape[0])


class QuantConv2d(QuantizedWeightMixin, CachedBufferState):
    """``nn.Conv2d`` (the patch embedding) with quantized input pixels and weight."""

    def __init__(self, conv: nn.Conv2d, spec: GroupSpec, group: str) -> None:
        super().__init__()
        self.group = group
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        # per channel, the pixel input has one range per colour channel (NCHW: dim 1)
        self.input_quantizer = _act_quantizer(spec, conv.in_channels, channel_axis=1)
        self.weight_quantizer = _weight_quantizer(spec, conv.out_channels)
        self.register_buffer("weights_frozen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.input_quantizer(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class QuantEmbedding(QuantizedWeightMixin, CachedBufferState):
    """Token-embedding table quantized per row (weight only: its input is integer ids)."""

    def __init__(self, embedding: nn.Embedding, spec: GroupSpec, group: str) -> None:
        super().__init__()
        self.group = group
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.weight_quantizer = _weight_quantizer(spec, self.num_embeddings)
        self.register_buffer("weights_frozen", torch.tensor(False))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.quantized_weight())


def _rename_legacy_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Load pre-hook: old-layout attention keys (see :mod:`p4q_lightning.legacy`) renamed."""
    rename_attention_keys(state_dict, prefix)


class QuantMultiheadAttention(nn.Module):
    """Replacement for open_clip's ``nn.MultiheadAttention`` (self-attention, any batch layout).

    Its projections are leaves: ``in_proj`` (q/k/v packed, a :class:`QuantLinear` of
    ``embed_dim -> 3 * embed_dim``, group ``attn_qkv``) and ``out_proj`` (group ``attn_out``),
    so other code finds every quantized weight as a linear layer and the int8 path swaps them
    for integer kernels (a LoRA wrapper would sit in the ``in_proj`` slot the same way) while
    this forward stays. The attention itself quantizes q, k, v and the post-softmax
    probabilities (``attn_internals``); its arithmetic is the one core in
    :mod:`p4q_lightning.quant.attention`, which the shared-prefix text path calls too. Masks follow
    ``nn.MultiheadAttention``: additive float or boolean (True = masked), 2-D ``[L, S]`` or
    3-D ``[B*heads, L, S]``.
    """

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        qkv: GroupSpec,
        internals: GroupSpec,
        out: GroupSpec,
        tower: str,
    ) -> None:
        super().__init__()
        if mha.in_proj_weight is None:  # separate q/k/v weights (kdim/vdim != embed_dim)
            raise ValueError(
                "only attention with a packed in_proj_weight (as open_clip builds) is supported"
            )
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.in_proj = QuantLinear.sharing(
            mha.in_proj_weight, mha.in_proj_bias, qkv, f"{tower}.attn_qkv"
        )
        self.internals_quantized = internals.a_bits is not None
        internal_spec = GroupSpec(
            a_bits=internals.a_bits,
            a_observer=internals.a_observer,
            percentile=internals.percentile,
            a_grid=internals.a_grid,
            a_score_on=internals.a_score_on,
        )
        self.q_quantizer = _act_quantizer(internal_spec, self.head_dim)
        self.k_quantizer = _act_quantizer(internal_spec, self.head_dim)
        self.v_quantizer = _act_quantizer(internal_spec, self.head_dim)
        if internals.softmax_quantizer == "log2":
            self.probs_quantizer: nn.Module = Log2Quantizer(internals.a_bits)
        else:
            probs_spec = GroupSpec(a_bits=internals.a_bits, a_observer="minmax")
            self.probs_quantizer = _act_quantizer(probs_spec, 1)
        self.out_proj = QuantLinear.from_float(mha.out_proj, out, f"{tower}.attn_out")
        self._packed_qkv: dict[str, Any] = {}  # the core's packed q/k/v parameters
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("QuantMultiheadAttention does not return attention weights")
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("QuantMultiheadAttention supports self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, length, _ = x.shape
        mask = self._merge_masks(attn_mask, key_padding_mask, b, length, x.dtype)
        dropout = self.dropout if self.training else 0.0
        out, _ = attend(self.attention_layer(), x, mask, dropout=dropout)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def attention_layer(self) -> AttentionLayer:
        """This layer as the attention core sees it: whatever sits in the ``in_proj`` and
        ``out_proj`` slots now (QuantLinear, Int8Linear, or a wrapper such as LoRA) and the
        internal quantizers (see :mod:`p4q_lightning.quant.attention`)."""
        internals = None
        if self.internals_quantized:
            internals = AttentionInternals(
                self.q_quantizer, self.k_quantizer, self.v_quantizer, self.probs_quantizer
            )
        return AttentionLayer(
            self.num_heads, self.in_proj, self.project_out, internals, self._packed_qkv
        )

    def project_out(self, out: torch.Tensor, out_scale: float) -> torch.Tensor:
        """The output projection of ``out * out_scale`` (heads merged, batch first)."""
        forward_scaled = getattr(self.out_proj, "forward_scaled", None)
        if forward_scaled is not None:
            return forward_scaled(out, out_scale)
        # out_proj swapped for another layer (e.g. an int8 export)
        return self.out_proj(out * out_scale if out_scale != 1.0 else out)

    def _merge_masks(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        length: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive mask broadcastable to [B, heads, L, L]."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:
                mask = mask.view(batch, self.num_heads, length, -1)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(batch, 1, 1, length)
            mask = pad if mask is None else mask + pad
        return mask

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, heads={self.num_heads}, "
            f"internals_quantized={self.internals_quantized}"
        )


def attention_layer(attn: nn.Module) -> AttentionLayer:
    """The attention core's view of ``attn``: our quantized attention, or a float
    ``nn.MultiheadAttention`` with a packed q/k/v weight (e.g. the teacher's)."""
    if isinstance(attn, QuantMultiheadAttention):
        return attn.attention_layer()
    if isinstance(attn, nn.MultiheadAttention):
        return float_attention_layer(attn)
    raise TypeError(f"{type(attn).__name__} is not a supported self-attention layer")


def runs_on_the_core(attn: nn.Module, training: bool) -> bool:
    """Whether :func:`attention_layer` can describe ``attn`` with nothing left out: our
    attention, or a float ``nn.MultiheadAttention`` with one packed q/k/v weight and no
    extra key/value bias; in training mode only without attention dropout."""
    if training and getattr(attn, "dropout", 0.0):
        return False
    if isinstance(attn, QuantMultiheadAttention):
        return True
    if isinstance(attn, nn.MultiheadAttention):
        return attn.in_proj_weight is not None and attn.bias_k is None
    return False


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)
