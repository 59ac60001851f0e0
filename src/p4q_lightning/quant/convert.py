"""Turn an open_clip CLIP into a quantized student: the one verb :func:`quantize`."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from p4q_lightning.quant.modules import (
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
)
from p4q_lightning.quant.quantizer import ActivationQuantizer, Log2Quantizer, WeightQuantizer
from p4q_lightning.quant.spec import QuantSpec, get_spec

SPEC_ATTR = "p4q_quant_spec"
#: layers holding a quantized weight; attention holds its q/k/v and output projections as
#: QuantLinear leaves, so each weight is found once
QUANT_MODULES = (QuantLinear, QuantConv2d, QuantEmbedding)


def text_tower_root(model: nn.Module) -> nn.Module:
    """The module that holds an open_clip model's text tower (``token_embedding``,
    ``transformer``, ``ln_final``...): ``model.text`` of a ``CustomTextCLIP``, else the
    ``CLIP`` itself. The one place this layout fact is written."""
    return model.text if hasattr(model, "text") else model


def text_tower_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer, token_embedding) of the text tower of a ``CLIP`` or ``CustomTextCLIP``."""
    root = text_tower_root(model)
    if not hasattr(root, "transformer") or not hasattr(root, "token_embedding"):
        raise TypeError(
            f"{type(root).__name__} has no open_clip text transformer: only open_clip CLIP "
            "models with their own text tower (not HF text towers) can be quantized"
        )
    return root.transformer, root.token_embedding


def vision_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise TypeError(
            f"{type(visual).__name__} is not an open_clip VisionTransformer: only ViT image "
            "towers (e.g. ViT-B-32, ViT-S-32) can be quantized"
        )
    return visual


def _quantize_transformer(transformer: nn.Module, spec: QuantSpec, tower: str) -> None:
    for i, block in enumerate(transformer.resblocks):
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise TypeError(
                f"{tower} block {i} uses {type(block.attn).__name__}; quantization supports "
                "open_clip's default blocks (nn.MultiheadAttention), not block_type='custom'"
            )
        block.attn = QuantMultiheadAttention(
            block.attn,
            spec[f"{tower}.attn_qkv"],
            spec[f"{tower}.attn_internals"],
            spec[f"{tower}.attn_out"],
            tower,
        )
        block.mlp.c_fc = QuantLinear.from_float(
            block.mlp.c_fc, spec[f"{tower}.mlp_fc"], f"{tower}.mlp_fc"
        )
        block.mlp.c_proj = QuantLinear.from_float(
            block.mlp.c_proj, spec[f"{tower}.mlp_proj"], f"{tower}.mlp_proj"
        )


def quantize(
    model: nn.Module,
    spec: str | QuantSpec | Mapping[str, Any] = "w8a8",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> nn.Module:
    """Return a frozen, quantized deep copy of an open_clip CLIP; ``model`` is untouched.

    ``spec`` is a preset name (``fp``, ``w8a8``, ``w6a6``, ``w4a8``, ``w4a4``, ``p4q-448``,
    ``p4q-official``), a :class:`QuantSpec` or its dict form; ``overrides`` changes single
    groups (see :func:`get_spec`). The copy must be calibrated (:func:`calibrate`) before use,
    unless nothing in it is quantized.
    """
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError(
            "this model is already a quantized student; quantize the float open_clip model "
            "instead (quantize returns a copy, so the original is still at hand)"
        )
    resolved = get_spec(spec, overrides)
    student = copy.deepcopy(model)
    visual = vision_tower(student)
    text_transformer, token_embedding = text_tower_parts(student)
    visual.conv1 = QuantConv2d(visual.conv1, resolved["vision.patch_embed"], "vision.patch_embed")
    _quantize_transformer(visual.transformer, resolved, "vision")
    _quantize_transformer(text_transformer, resolved, "text")
    text_tower_root(student).token_embedding = QuantEmbedding(
        token_embedding, resolved["text.token_embedding"], "text.token_embedding"
    )
    # the new quantizers' buffers are created on the CPU: put them where the weights are
    student.to(next(model.parameters()).device)
    student.requires_grad_(False)
    student.eval()
    setattr(student, SPEC_ATTR, resolved)
    return student


def quant_spec_of(model: nn.Module) -> QuantSpec:
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise ValueError("this model was not produced by p4q_lightning.quantize")
    return spec


def quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer with a quantized weight (each weight once)."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULES):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, quantizer) of every enabled quantizer."""
    for name, module in model.named_modules():
        if (
            isinstance(module, (ActivationQuantizer, WeightQuantizer, Log2Quantizer))
            and module.enabled
        ):
            yield name, module


def is_calibrated(model: nn.Module) -> bool:
    """True when every enabled quantizer has its parameters (nothing left to observe)."""
    for _, q in quantizers(model):
        if isinstance(q, Log2Quantizer):
            continue
        if isinstance(q, WeightQuantizer) and q.dynamic:
            continue
        if not bool(q.calibrated):
            return False
    return True
