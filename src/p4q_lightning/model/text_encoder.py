"""Running prompt embeddings and token ids through an open_clip text tower.

Both paths truncate sequences to the longest prompt (exact: under the causal mask no position
after EOT reaches the EOT output), pool at EOT, and process classes in chunks. With
``checkpointing`` each chunk keeps only its input for the backward pass, so a 1,000-class step
fits in memory; only input gradients flow (the tower's weights are frozen). Prompts that share
their first positions (a unified CoOp context before the class name) run that prefix once
(:mod:`~p4q_lightning.model.shared_prefix`); chunks and checkpointing apply to the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    ) -> torch.Tensor:
        """Text features of the per-class positions ``x`` [n, R, width] after a shared prefix
        whose per-layer keys and values are ``kv_tensors`` (k0, v0, k1, v1, ...) with
        ``scales`` ((k scale, v scale) per layer); ``eot_index`` counts from the first
        per-class position. Tensors are positional so that checkpointing sees them."""
        n_prefix = kv_tensors[0].shape[-2]
        kvs = [(kv_tensors[2 * i], kv_tensors[2 * i + 1], *scales[i]) for i in range(len(scales))]
        x = self._with_positions(x, start=n_prefix)
        x = sp.encode_rest(self.root.transformer.resblocks, x, self.root.attn_mask, kvs)
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

    ``chunk_size`` classes run at a time (None: all at once); ``checkpointing`` recomputes each
    chunk in the backward pass instead of storing its activations. ``shared_prefix`` (e.g.
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
        encode = partial(tower.encode_rest, [(s_k, s_v) for _, _, s_k, s_v in kvs])
        extra = tuple(t for k, v, _, _ in kvs for t in (k, v))
        prompts, eot_index = prompts[:, shared_prefix:], eot_index - shared_prefix
    outputs = []
    for start in range(0, n, step):
        chunk, eot = prompts[start : start + step], eot_index[start : start + step]
        if use_ckpt:
            outputs.append(checkpoint(encode, chunk, eot, *extra, use_reentrant=False))
        else:
            outputs.append(encode(chunk, eot, *extra))
    return torch.cat(outputs, dim=0)


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
