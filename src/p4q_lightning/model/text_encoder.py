"""Running prompt embeddings and token ids through an open_clip text tower.

Both paths truncate sequences to the longest prompt (exact: under the causal mask no position
after EOT reaches the EOT output), pool at EOT, and process classes in chunks. With
``checkpointing`` each chunk keeps only its input for the backward pass, so a 1,000-class step
fits in memory; only input gradients flow (the tower's weights are frozen).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class TextTower:
    """Uniform access to the text tower parts of an open_clip ``CLIP`` or ``CustomTextCLIP``."""

    def __init__(self, model: nn.Module) -> None:
        root = model.text if hasattr(model, "text") else model
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

    def encode_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features (unnormalised) of token embeddings ``x`` [n, L, width], L <= context."""
        root = self.root
        length = x.shape[1]
        cast = (
            root.transformer.get_cast_dtype()
            if hasattr(root.transformer, "get_cast_dtype")
            else x.dtype
        )
        x = x.to(cast) + root.positional_embedding[:length].to(cast)
        mask = root.attn_mask[:length, :length] if self.causal else None
        x = root.transformer(x, attn_mask=mask)
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
) -> torch.Tensor:
    """Encode prompt embeddings [n, L, width] (e.g. from a PromptLearner) to text features [n, D].

    ``chunk_size`` classes run at a time (None: all at once); ``checkpointing`` recomputes each
    chunk in the backward pass instead of storing its activations.
    """
    tower = TextTower(model)
    if not tower.causal and prompts.shape[1] != tower.context_length:
        raise ValueError("a text tower without a causal mask needs full-length prompts")
    n = prompts.shape[0]
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    use_ckpt = checkpointing and torch.is_grad_enabled() and prompts.requires_grad
    outputs = []
    for start in range(0, n, step):
        chunk, eot = prompts[start : start + step], eot_index[start : start + step]
        if use_ckpt:
            outputs.append(checkpoint(tower.encode_embeddings, chunk, eot, use_reentrant=False))
        else:
            outputs.append(tower.encode_embeddings(chunk, eot))
    return torch.cat(outputs, dim=0)


@torch.no_grad()
def encode_tokens(
    model: nn.Module, token_ids: torch.Tensor, chunk_size: int | None = 1024
) -> torch.Tensor:
    """``model.encode_text(token_ids)`` truncated to the longest sequence and chunked (no grad)."""
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


@torch.no_grad()
def template_text_features(
    model: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    chunk_size: int | None = 1024,
) -> torch.Tensor:
    """Zero-shot classifier [n_cls, D]: per class, the renormalised mean of the normalised
    embeddings of every template filled with the class name."""
    if not templates:
        raise ValueError(
            "template_text_features needs at least one template such as 'a photo of a {}.'"
        )
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name")
    names = [str(c).replace("_", " ") for c in classnames]
    texts = [t.format(c) for c in names for t in templates]
    features = encode_tokens(model, tokenizer(texts), chunk_size)
    features = (
        F.normalize(features.float(), dim=-1).view(len(names), len(templates), -1).mean(dim=1)
    )
    return F.normalize(features, dim=-1)
