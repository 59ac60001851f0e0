"""The two graphs: images -> class logits (image tower, adapter, cosine head) and token ids of
class names -> class embeddings (text tower with the learned context spliced in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from p4q_lightning.export.onnx.layers import LayerWriter, UnsupportedForOnnx

IMAGES, LOGITS, FEATURES = "images", "logits", "image_features"
TOKENS, CLASS_EMBEDDINGS = "token_ids", "class_embeddings"


def _check_vision(visual: nn.Module) -> None:
    """Refuse open_clip vision settings the graph below does not write."""
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedForOnnx("attentional pooling (CoCa-style towers) is not supported")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise UnsupportedForOnnx(f"vision pool_type {visual.pool_type!r} is not supported")
    if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        raise UnsupportedForOnnx("only open_clip VisionTransformer image towers are supported")


def image_size(visual: nn.Module) -> tuple[int, int]:
    size = visual.image_size
    return (
        (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    )


def write_image_tower(w: LayerWriter, visual: nn.Module, images: str) -> str:
    """open_clip's ``VisionTransformer.forward``: patches, class token, positions, blocks, pool,
    projection -> [B, embed_dim]."""
    _check_vision(visual)
    g = w.g
    x = w.patch_embed(images, visual.conv1, image_size(visual), "visual.conv1")  # [B, L, width]
    width = int(visual.class_embedding.shape[-1])
    batch = g.op(
        "Slice", [g.op("Shape", [images]), g.ints("zero1", [0]), g.ints("one1", [1])], "batch"
    )
    cls_shape = g.op("Concat", [batch, g.ints(f"one_{width}", [1, width])], axis=0)
    cls = g.op(
        "Expand",
        [g.const("visual.class_embedding", visual.class_embedding.reshape(1, 1, width)), cls_shape],
        "visual.cls",
    )
    x = g.op("Concat", [cls, x], "visual.with_cls", axis=1)
    x = g.op(
        "Add",
        [x, g.const("visual.positional_embedding", visual.positional_embedding)],
        "visual.embed",
    )
    x = w.layer_norm(x, visual.ln_pre, "visual.ln_pre")
    x = w.transformer(x, visual.transformer, None, "visual.transformer")

    def pool(t: str) -> str:
        if visual.pool_type == "avg":
            rest = g.op(
                "Slice", [t, g.ints("one1", [1]), g.ints("int_max", [2**62]), g.ints("one1", [1])]
            )
            return g.op("ReduceMean", [rest, g.ints("one1", [1])], "visual.pooled", keepdims=0)
        return g.op(
            "Gather",
            [t, g.const("index0", torch.tensor(0, dtype=torch.int64))],
            "visual.pooled",
            axis=1,
        )

    if getattr(visual, "final_ln_after_pool", False):
        pooled = w.layer_norm(pool(x), visual.ln_post, "visual.ln_post")
    else:
        pooled = pool(w.layer_norm(x, visual.ln_post, "visual.ln_post"))
    if visual.proj is not None:
        pooled = g.op("MatMul", [pooled, g.const("visual.proj", visual.proj)], "visual.projected")
    return pooled


def write_adapter(w: LayerWriter, adapter: nn.Module | None, features: str) -> str:
    """The P4Q ``LowBitAdapter``: ratio * fc2(act(fc1(z))) + (1 - ratio) * z."""
    if adapter is None:
        return features
    for part in ("fc1", "fc2", "act", "ratio"):
        if not hasattr(adapter, part):
            raise UnsupportedForOnnx(
                f"adapter {type(adapter).__name__} has no ONNX form (LowBitAdapter only)"
            )
    g = w.g
    h = w.linear(features, adapter.fc1, "adapter.fc1")
    h = w.activation_fn(h, adapter.act, "adapter.act")
    h = w.linear(h, adapter.fc2, "adapter.fc2")
    ratio = float(adapter.ratio)
    branch = g.op("Mul", [h, g.const("adapter.ratio", ratio)])
    residual = g.op("Mul", [features, g.const("adapter.keep", 1.0 - ratio)])
    return g.op("Add", [branch, residual], "adapter.out")


def write_image_graph(
    w: LayerWriter,
    visual: nn.Module,
    adapter: nn.Module | None,
    text_features: torch.Tensor,
    logit_scale: float,
) -> tuple[list, list]:
    """images [B, 3, H, W] -> logits [B, C] and normalised image features [B, D]."""
    g = w.g
    height, width = image_size(visual)
    features = write_adapter(w, adapter, write_image_tower(w, visual, IMAGES))
    normed = w.normalize(features, "image.normalized")
    classes = F.normalize(text_features.detach().float(), dim=-1)
    logits = g.op("MatMul", [normed, g.const("class_matrix", classes.t().contiguous())], "cosine")
    scaled = g.op("Mul", [logits, g.const("logit_scale", float(logit_scale))], "logits_scaled")
    g.identity(scaled, LOGITS)
    g.identity(normed, FEATURES)
    n, d = classes.shape
    inputs = [helper.make_tensor_value_info(IMAGES, TensorProto.FLOAT, ["batch", 3, height, width])]
    outputs = [
        helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", n]),
        helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", d]),
    ]
    return inputs, outputs


def text_root(clip: nn.Module) -> nn.Module:
    return clip.text if hasattr(clip, "text") else clip


def write_text_graph(
    w: LayerWriter, clip: nn.Module, ctx: torch.Tensor, pool_type: str, eos_id: int | None
) -> tuple[list, list]:
    """token ids [M, L] of ``"<name>."`` (the tokenizer's, SOS first) -> normalised class
    embeddings [M, D]: the learned context is spliced in after SOS, as the prompt learner does
    with its class token at the end (``[SOS] ctx_1..ctx_n <name> . [EOS]``)."""
    g = w.g
    root = text_root(clip)
    if getattr(root, "cls_emb", None) is not None:
        raise UnsupportedForOnnx("text towers with a CLS embedding are not supported")
    if pool_type not in ("argmax", "eos"):
        raise UnsupportedForOnnx(f"text pool type {pool_type!r} is not supported")
    length, width = root.positional_embedding.shape
    ctx = ctx.detach().float()
    if ctx.dim() != 2 or ctx.shape[1] != width:
        raise UnsupportedForOnnx(
            f"the learned context has shape {list(ctx.shape)}: only one context shared by all "
            "classes (not class-specific) can take new class names"
        )
    n_ctx = ctx.shape[0]
    ids = TOKENS
    first = g.op("Slice", [ids, g.ints("zero1", [0]), g.ints("one1", [1]), g.ints("one1", [1])])
    rest = g.op(
        "Slice",
        [ids, g.ints("one1", [1]), g.ints("rest_end", [length - n_ctx]), g.ints("one1", [1])],
    )
    batch = g.op(
        "Slice", [g.op("Shape", [ids]), g.ints("zero1", [0]), g.ints("one1", [1])], "text.batch"
    )
    ctx_shape = g.op("Concat", [batch, g.ints("ctx_shape", [n_ctx, width])], axis=0)
    context = g.op(
        "Expand", [g.const("text.context", ctx.unsqueeze(0)), ctx_shape], "text.context_b"
    )
    x = g.op(
        "Concat",
        [
            w.embedding_gather(first, root.token_embedding, "text.token_embedding"),
            context,
            w.embedding_gather(rest, root.token_embedding, "text.token_embedding_rest"),
        ],
        "text.prompt",
        axis=1,
    )
    x = g.op(
        "Add", [x, g.const("text.positional_embedding", root.positional_embedding)], "text.embed"
    )
    mask = None
    if getattr(root, "attn_mask", None) is not None:
        mask = g.const("text.attn_mask", root.attn_mask[:length, :length])
    x = w.transformer(x, root.transformer, mask, "text.transformer")
    x = w.layer_norm(x, root.ln_final, "text.ln_final")
    if pool_type == "argmax":
        eot = g.op("ArgMax", [ids], "text.eot", axis=-1, keepdims=1)
    else:
        is_eos = g.op(
            "Cast",
            [g.op("Equal", [ids, g.const("eos_id", torch.tensor(eos_id))])],
            to=TensorProto.INT32,
        )
        eot = g.op("ArgMax", [is_eos], "text.eot", axis=-1, keepdims=1)
    eot = g.op(
        "Min",
        [
            g.op("Add", [eot, g.const("n_ctx", torch.tensor(n_ctx))]),
            g.const("last_position", torch.tensor(length - 1)),
        ],
        "text.eot_spliced",
    )
    index = g.op(
        "Expand",
        [
            g.op("Unsqueeze", [eot, g.ints("axis_last", [-1])]),
            g.op("Concat", [batch, g.ints(f"one_{width}", [1, width])], axis=0),
        ],
    )
    pooled = g.op(
        "Squeeze", [g.op("GatherElements", [x, index], axis=1), g.ints("one1", [1])], "text.pooled"
    )
    proj = root.text_projection
    if isinstance(proj, nn.Linear):
        pooled = w.linear(pooled, proj, "text.text_projection")
    elif proj is not None:
        pooled = g.op("MatMul", [pooled, g.const("text.text_projection", proj)], "text.projected")
    g.identity(w.normalize(pooled, "text.normalized"), CLASS_EMBEDDINGS)
    embed = (
        int(proj.shape[-1])
        if isinstance(proj, torch.Tensor)
        else (proj.out_features if isinstance(proj, nn.Linear) else width)
    )
    inputs = [helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["classes", length])]
    outputs = [
        helper.make_tensor_value_info(CLASS_EMBEDDINGS, TensorProto.FLOAT, ["classes", embed])
    ]
    return inputs, outputs
