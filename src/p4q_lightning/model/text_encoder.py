"""Running prompt embeddings and token ids through an open_clip text tower.

Both paths truncate sequences to the longest prompt (exact: under the causal mask no position
after EOT reaches the EOT output), pool at EOT, and process classes in pieces. Prompt pieces
are cut from the classes sorted by prompt length and each piece is truncated to its own longest
prompt, so a class list with a few long names (ImageNet's longest prompt is over three times its
median) does not pad every class to the longest one: the cost stays linear in the number of
classes. Only input gradients flow (the tower's weights are frozen).
Prompts that share their first positions (a unified CoOp context before the class name) run that
prefix once (:mod:`~p4q_lightning.model.shared_prefix`); pieces and checkpointing apply to the
rest.

``checkpointing`` trades backward time for memory, so that a 1,000-class step fits. With a
shared prefix (P4Q's unified context) each block keeps its MLP's input instead of the MLP's
activations and recomputes the widening half (``c_fc`` and the GELU) in the backward pass:
about half the memory of no checkpointing, for a third of the matmuls again and no per-op
overhead. On the full path each chunk keeps only its input and the outputs of its
non-widening matmuls (selective checkpointing of the whole chunk), which recomputes more and
dispatches every op through Python, but keeps the least.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from p4q_lightning.model import shared_prefix as sp
from p4q_lightning.quant.convert import text_tower_root

#: Shorter shared prefixes run on the full path: splitting off one token saves too little.
MIN_SHARED_PREFIX = 2


class TextTower:
    """Uniform access to the text tower parts of an open_clip ``CLIP`` or ``CustomTextCLIP``."""

    def __init__(self, model: nn.Module) -> None:
        root = text_tower_root(model)
        for part in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(root, part):
                raise TypeError(
                    f"{type(model).__name__} has no open_clip text transformer ({part} missing): "
                    "prompt learning needs a CLIP with its own text tower, not an HF text model"
                )
        if getattr(root, "cls_emb", None) is not None:
            raise TypeError(
                "text towers with a CLS embedding are not supported for prompt learning"
            )
        self.root = root
        self.pool_type = getattr(model, "text_pool_type", getattr(root, "pool_type", "argmax"))
        self.eos_id = getattr(model, "text_eos_id", getattr(root, "eos_id", None))
        if self.pool_type not in ("argmax", "eos"):
            raise TypeError(
                f"text pool type {self.pool_type!r} is not supported: prompt learning pools at the "
                "end-of-text token (pool_type 'argmax' or 'eos')"
            )
        self.causal = getattr(root, "attn_mask", None) is not None

    @property
    def token_embedding(self) -> nn.Module:
        return self.root.token_embedding

    @property
    def width(self) -> int:
        return int(self.root.positional_embedding.shape[-1])

    @property
    def context_length(self) -> int:
        return int(self.root.positional_embedding.shape[0])

    def eot_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        return (token_ids == self.eos_id).int().argmax(dim=-1)

    def _with_positions(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        root = self.root
        cast = (
            root.transformer.get_cast_dtype()
            if hasattr(root.transformer, "get_cast_dtype")
            else x.dtype
        )
        return x.to(cast) + root.positional_embedding[start : start + x.shape[1]].to(cast)

    def encode_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features (unnormalised) of token embeddings ``x`` [n, L, width], L <= context."""
        root = self.root
        length = x.shape[1]
        x = self._with_positions(x)
        mask = root.attn_mask[:length, :length] if self.causal else None
        x = root.transformer(x, attn_mask=mask)
        return self.pool(x, eot_index)

    def shared_prefix_supported(self) -> bool:
        """Whether :meth:`encode_rest` may run a shared prefix once (see ``shared_prefix``)."""
        return self.causal and sp.supports_shared_prefix(self.root.transformer)

    def encode_prefix(self, prefix: torch.Tensor) -> list[sp.PrefixKV]:
        """Per-layer keys/values of the shared prompt prefix ``[1, P, width]``."""
        blocks = self.root.transformer.resblocks
        return sp.encode_prefix(blocks, self._with_positions(prefix), self.root.attn_mask)

    def encode_rest(
        self,
        scales: Sequence[tuple[float, float]],
        x: torch.Tensor,
        eot_index: torch.Tensor,
        *kv_tensors: torch.Tensor,
        recompute_mlp: bool = False,
    ) -> torch.Tensor:
        """Text features of the per-class positions ``x`` [n, R, width] after a shared prefix
        whose per-layer keys and values are ``kv_tensors`` (k0, v0, k1, v1, ...) with
        ``scales`` ((k scale, v scale) per layer); ``eot_index`` counts from the first
        per-class position. ``recompute_mlp``: checkpoint each block's MLP
        (:func:`~p4q_lightning.model.shared_prefix.encode_rest`)."""
        n_prefix = kv_tensors[0].shape[-2]
        kvs = [(kv_tensors[2 * i], kv_tensors[2 * i + 1], *scales[i]) for i in range(len(scales))]
        x = self._with_positions(x, start=n_prefix)
        blocks = self.root.transformer.resblocks
        x = sp.encode_rest(blocks, x, self.root.attn_mask, kvs, recompute_mlp)
        return self.pool(x, eot_index)

    def pool(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, the EOT position of each sequence, and the text projection."""
        root = self.root
        x = root.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = root.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj


def encode_prompts(
    model: nn.Module,
    prompts: torch.Tensor,
    eot_index: torch.Tensor,
    chunk_size: int | None = None,
    checkpointing: bool = False,
    shared_prefix: int = 0,
) -> torch.Tensor:
    """Encode prompt embeddings [n, L, width] (e.g. from a PromptLearner) to text features [n, D].

    ``chunk_size`` classes run at a time (None: all at once); ``checkpointing`` recomputes
    activations in the backward pass instead of storing them (see the module docstring).
    ``shared_prefix`` (e.g.
    ``PromptLearner.shared_prefix_length``) is how many leading positions every prompt shares:
    they run once when the tower allows it (same result), else the full path runs.
    """
    tower = TextTower(model)
    if not tower.causal and prompts.shape[1] != tower.context_length:
        raise ValueError("a text tower without a causal mask needs full-length prompts")
    n = prompts.shape[0]
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    use_ckpt = checkpointing and torch.is_grad_enabled() and prompts.requires_grad
    encode, extra = tower.encode_embeddings, ()
    if shared_prefix >= MIN_SHARED_PREFIX and tower.shared_prefix_supported():
        _check_shared_prefix(prompts, eot_index, shared_prefix)
        kvs = tower.encode_prefix(prompts[:1, :shared_prefix])
        scales = [(s_k, s_v) for _, _, s_k, s_v in kvs]
        encode = partial(tower.encode_rest, scales, recompute_mlp=use_ckpt)
        use_ckpt = False  # checkpointing is inside each block, not around the chunk
        extra = tuple(t for k, v, _, _ in kvs for t in (k, v))
        prompts, eot_index = prompts[:, shared_prefix:], eot_index - shared_prefix
    if tower.causal:
        pieces = length_pieces(eot_index, step)
    else:  # every sequence keeps its full length
        pieces = [(min(step, n - s), prompts.shape[1]) for s in range(0, n, step)]
    order = torch.argsort(eot_index, stable=True) if tower.causal and len(pieces) > 1 else None
    if order is not None:  # one gather (and one scatter in the backward), then views
        prompts, eot_index = prompts.index_select(0, order), eot_index.index_select(0, order)
    sizes = [size for size, _ in pieces]
    outputs = []
    for chunk, eot, (_, length) in zip(
        prompts.split(sizes), eot_index.split(sizes), pieces, strict=True
    ):
        chunk = chunk[:, :length]
        if use_ckpt:
            outputs.append(
                checkpoint(
                    encode,
                    chunk,
                    eot,
                    *extra,
                    use_reentrant=False,
                    context_fn=_keep_narrow_matmuls,
                    **_SAC_HOOKS,
                )
            )
        else:
            outputs.append(encode(chunk, eot, *extra))
    features = torch.cat(outputs, dim=0)
    if order is None:
        return features
    return features.index_select(0, torch.argsort(order))


_MATMULS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
#: The matmul outputs selective checkpointing keeps bypass saved-tensor hooks (such as the
#: held-codes layers' one around each matmul, which has nothing to do with them); newer torch
#: warns unless told so explicitly.
_SAC_HOOKS = (
    {"respect_saved_tensors_hooks": False}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


def _narrow_matmul_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the output of a linear layer that does not widen its input (the MLP's output
    projection, attention's output projection); recompute everything else.

    Their outputs are the fewest bytes per FLOP saved (the MLP's is ``width`` values per
    position for ``4 * width**2`` multiply-adds), so keeping them removes about 5/12 of the
    linear layers' recomputation for a small fraction of the chunk's activations.
    """
    if op in _MATMULS:
        a, b = args[-2], args[-1]
        if a.shape[-1] >= b.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_narrow_matmuls() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_narrow_matmul_policy)


#: A piece costs about this many extra prompt positions of work (kernel launches, the per-layer
#: prefix keys and values it reads): shorter length groups are merged with their neighbours.
PIECE_OVERHEAD_POSITIONS = 64


def length_pieces(eot_index: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """How to cut the classes, sorted by prompt length, into pieces: ``(classes, length)`` each,
    ``length`` being the piece's longest prompt (its sequences are truncated to it).

    Adjacent prompt lengths are grouped so that the padded positions plus
    :data:`PIECE_OVERHEAD_POSITIONS` per piece are fewest (an exact split of the few distinct
    lengths); groups over ``chunk_size`` classes are then cut into chunks of at most
    ``chunk_size``.
    """
    lengths, counts = torch.unique(eot_index.detach().cpu() + 1, sorted=True, return_counts=True)
    lens, cnts = lengths.tolist(), counts.tolist()
    k = len(lens)
    # best[j]: least cost of the first j lengths; cut[j]: where its last group starts
    best, cut = [0.0] + [float("inf")] * k, [0] * (k + 1)
    for j in range(1, k + 1):
        classes = 0
        for i in range(j, 0, -1):  # last group = lengths i-1 .. j-1, padded to lens[j-1]
            classes += cnts[i - 1]
            cost = best[i - 1] + classes * lens[j - 1] + PIECE_OVERHEAD_POSITIONS
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], k
    while j > 0:
        groups.append((sum(cnts[cut[j] : j]), lens[j - 1]))
        j = cut[j]
    pieces = []
    for classes, length in reversed(groups):
        pieces += [(min(chunk_size, classes - s), length) for s in range(0, classes, chunk_size)]
    return pieces


def _check_shared_prefix(prompts: torch.Tensor, eot_index: torch.Tensor, n_prefix: int) -> None:
    """Refuse a ``shared_prefix`` the prompts do not share (it would silently change them)."""
    if n_prefix > int(eot_index.min()):
        raise ValueError(
            f"shared_prefix={n_prefix} reaches an end-of-text token (earliest at "
            f"{int(eot_index.min())}): the shared prefix must end before every class's own tokens"
        )
    with torch.no_grad():
        head = prompts[:, :n_prefix]
        if not bool((head == head[:1]).all()):
            raise ValueError(
                f"shared_prefix={n_prefix}, but the prompts differ within their first "
                f"{n_prefix} positions; pass the PromptLearner's shared_prefix_length"
            )


@torch.no_grad()
def encode_tokens(
    model: nn.Module, token_ids: torch.Tensor, chunk_size: int | None = 1024
) -> torch.Tensor:
    """``model.encode_text(token_ids)`` truncated to the longest sequence and chunked (no grad)."""
    return encode_tokens_with_grad(model, token_ids, chunk_size)


def encode_tokens_with_grad(
    model: nn.Module, token_ids: torch.Tensor, chunk_size: int | None = 1024
) -> torch.Tensor:
    """:func:`encode_tokens` keeping the graph when grad is enabled (CLIP-LoRA's text tower
    trains)."""
    tower = TextTower(model)
    device = tower.root.positional_embedding.device
    token_ids = token_ids.to(device)
    eot = tower.eot_index(token_ids)
    if tower.causal:
        token_ids = token_ids[:, : int(eot.max()) + 1]
    n = token_ids.shape[0]
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    out = []
    for start in range(0, n, step):
        ids = token_ids[start : start + step]
        out.append(tower.encode_embeddings(tower.token_embedding(ids), eot[start : start + step]))
    return torch.cat(out, dim=0)


def template_text_features(
    model: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    chunk_size: int | None = 1024,
    grad: bool = False,
) -> torch.Tensor:
    """Zero-shot classifier [n_cls, D]: per class, the renormalised mean of the normalised
    embeddings of every template filled with the class name (``grad``: keep the graph, for a
    text tower that trains)."""
    if not templates:
        raise ValueError(
            "template_text_features needs at least one template such as 'a photo of a {}.'"
        )
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name")
    names = [str(c).replace("_", " ") for c in classnames]
    texts = [t.format(c) for c in names for t in templates]
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        features = encode_tokens_with_grad(model, tokenizer(texts), chunk_size)
    features = (
        F.normalize(features.float(), dim=-1).view(len(names), len(templates), -1).mean(dim=1)
    )
    return F.normalize(features, dim=-1)
