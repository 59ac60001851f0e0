"""CoOp prompt learner: trainable context vectors spliced around tokenized class names.

Every class prompt is ``[SOS] ctx_1 .. ctx_n <name> . [EOS]`` (class token at the end; ``front``
and ``middle`` move the name). Only the context vectors are a parameter. The token ids and the
embeddings of the fixed tokens are non-persistent buffers, so a checkpoint holds nothing but
the context and a learned (unified) context loads onto any other class list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from p4q_lightning.args import PromptArgs

log = logging.getLogger(__name__)

ClassTokenPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"


def _encode(tokenizer: Callable[..., torch.Tensor], text: str) -> list[int]:
    """BPE ids of ``text`` without SOS/EOS (open_clip's SimpleTokenizer, or any open_clip one)."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text))
    ids = tokenizer([text])[0]
    nonzero = ids[ids != 0].tolist()
    return nonzero[1:-1]


class PromptLearner(nn.Module):
    """Learnable CoOp context for a list of class names.

    Args:
        classnames: the class names, in label order.
        tokenizer: the model's open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        embed_dim: width of the text tower's token embeddings.
        n_ctx: number of context vectors (ignored when ``ctx_init`` is given: its token count).
        ctx_init: words to initialise the context from (e.g. ``"a photo of a"``); None draws
            the context from N(0, ``init_std``).
        init_embedding: token-embedding table used to embed ``ctx_init`` (the float model's).
        class_specific: one context per class (CoOp's CSC) instead of one shared context.
        class_token_position: where the class name sits relative to the context.
        init_std: standard deviation of the random initialisation.
        generator: draws the random initialisation (default: the global generator); pass a
            seeded one to make it independent of the process's other random draws.
    """

    @classmethod
    def from_args(
        cls,
        classnames: Sequence[str],
        tokenizer: Callable[..., torch.Tensor],
        embed_dim: int,
        prompt: PromptArgs,
        init_embedding: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> PromptLearner:
        """The prompt learner of the ``model.prompt`` option group (the text tower's
        ``chunk_size``/``checkpointing`` options are the encoder's, not read here)."""
        return cls(
            classnames,
            tokenizer,
            embed_dim,
            n_ctx=prompt.n_ctx,
            ctx_init=prompt.ctx_init,
            init_embedding=init_embedding,
            class_specific=prompt.class_specific,
            class_token_position=prompt.class_token_position,
            init_std=prompt.init_std,
            generator=generator,
        )

    def __init__(
        self,
        classnames: Sequence[str],
        tokenizer: Callable[..., torch.Tensor],
        embed_dim: int,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        init_embedding: nn.Module | None = None,
        class_specific: bool = False,
        class_token_position: ClassTokenPosition = "end",
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.register_load_state_dict_pre_hook(self._check_loaded_ctx)
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(
                f"class_token_position={class_token_position!r}: use 'end', 'middle' or 'front'"
            )
        self.tokenizer = tokenizer
        self.class_specific = class_specific
        self.class_token_position = class_token_position
        self.ctx_init = ctx_init
        if ctx_init:
            init_ids = _encode(tokenizer, ctx_init)
            if not init_ids:
                raise ValueError(f"ctx_init={ctx_init!r} encodes to no tokens")
            if n_ctx != len(init_ids):
                log.info(
                    "ctx_init %r has %d tokens: using n_ctx=%d",
                    ctx_init,
                    len(init_ids),
                    len(init_ids),
                )
            n_ctx = len(init_ids)
        if n_ctx < 1:
            raise ValueError(f"n_ctx={n_ctx}: a prompt needs at least one context vector")
        self.n_ctx = n_ctx
        self.embed_dim = embed_dim

        n_rows = len(classnames) if class_specific else 1
        if ctx_init:
            if init_embedding is None:
                raise ValueError(
                    "ctx_init needs init_embedding (the float model's token_embedding)"
                )
            ids = torch.tensor(_encode(tokenizer, ctx_init), device=init_embedding.weight.device)
            with torch.no_grad():
                vectors = init_embedding(ids).detach().float().cpu()
            ctx = vectors.unsqueeze(0).repeat(n_rows, 1, 1)
        else:
            ctx = torch.empty(n_rows, n_ctx, embed_dim).normal_(0.0, init_std, generator=generator)
        # Registered as a module parameter (the official code's `.to('cuda')` made it a
        # non-leaf tensor that never trained).
        self.ctx = nn.Parameter(ctx if class_specific else ctx[0])
        self.set_classnames(classnames)

    # ------------------------------------------------------------------ class list
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """(Re)build the token ids and context positions for ``classnames``.

        The context is kept: a unified context transfers to any class list; a class-specific
        one only to a list of the same length.
        """
        classnames = [str(c).replace("_", " ").strip() for c in classnames]
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        if self.class_specific and self.ctx.shape[0] != len(classnames):
            raise ValueError(
                f"class-specific context was learned for {self.ctx.shape[0]} classes and cannot "
                f"be used for {len(classnames)}; use class_specific=False to transfer prompts"
            )
        self.classnames = classnames
        context_length = getattr(self.tokenizer, "context_length", 77)
        texts, slots = [], []
        for name in classnames:
            text = self._prompt_text(name)
            needed = len(_encode(self.tokenizer, text)) + 2  # with SOS and EOS
            if needed > context_length:
                raise ValueError(
                    f"class name {name!r} is too long: its prompt needs {needed} tokens but "
                    f"the text tower takes {context_length}; shorten the name or lower "
                    f"n_ctx ({self.n_ctx})"
                )
            texts.append(text)
            slots.append(self._ctx_positions(len(_encode(self.tokenizer, name))))
        token_ids = self.tokenizer(texts)
        if token_ids.dim() != 2:
            raise TypeError("the tokenizer must return a [n, context_length] id tensor")
        eot_id = getattr(self.tokenizer, "eot_token_id", None)
        eot = (
            token_ids.argmax(dim=-1)
            if eot_id is None
            else (token_ids == eot_id).int().argmax(dim=-1)
        )
        placeholder = _encode(self.tokenizer, PLACEHOLDER)
        for name, ids, positions in zip(classnames, token_ids, slots, strict=True):
            if len(placeholder) != 1 or not bool((ids[positions] == placeholder[0]).all()):
                raise ValueError(
                    f"class name {name!r} tokenizes differently alone and inside its prompt, "
                    "so the context positions are unknown; simplify the name (plain words)"
                )
        length = int(eot.max()) + 1
        token_ids = token_ids[:, :length]
        slot = torch.zeros(len(classnames), length, dtype=torch.long)
        mask = torch.zeros(len(classnames), length, dtype=torch.bool)
        for i, positions in enumerate(slots):
            slot[i, positions] = torch.arange(self.n_ctx)
            mask[i, positions] = True
        device = self.ctx.device
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)
        self.register_buffer("eot_index", eot.to(device), persistent=False)
        self.register_buffer("ctx_slot", slot.to(device), persistent=False)
        self.register_buffer("ctx_mask", mask.to(device), persistent=False)
        # Embeddings of the fixed tokens (prefix, name, suffix); filled by set_token_embedding.
        self.register_buffer("fixed_embeds", None, persistent=False)
        self.shared_prefix_length = self._shared_prefix(token_ids, slot, mask, eot)

    def _shared_prefix(
        self, token_ids: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor, eot: torch.Tensor
    ) -> int:
        """How many leading positions are the same in every class prompt (and end before
        every EOT): the same fixed token, or the same unified context vector."""
        same_token = (token_ids == token_ids[:1]).all(dim=0) & ~mask.any(dim=0)
        same_ctx = (mask == mask[:1]).all(dim=0) & (slot == slot[:1]).all(dim=0) & mask[0]
        same = same_token | (same_ctx & (not self.class_specific))
        return min(int(same.int().cumprod(dim=0).sum()), int(eot.min()))

    def _prompt_text(self, name: str) -> str:
        # Placeholders mark the context slots; their embeddings are overwritten by the context.
        placeholder = [PLACEHOLDER] * self.n_ctx
        if self.class_token_position == "end":
            return " ".join([*placeholder, name]) + "."
        if self.class_token_position == "front":
            return " ".join([name, *placeholder]) + "."
        half = self.n_ctx // 2
        return " ".join([*placeholder[:half], name, *placeholder[half:]]) + "."

    def _ctx_positions(self, name_len: int) -> torch.Tensor:
        """Sequence positions of the context vectors (position 0 is SOS)."""
        n = self.n_ctx
        if self.class_token_position == "end":
            return torch.arange(1, 1 + n)
        if self.class_token_position == "front":
            return torch.arange(1 + name_len, 1 + name_len + n)
        half = n // 2
        return torch.cat(
            [torch.arange(1, 1 + half), torch.arange(1 + half + name_len, 1 + n + name_len)]
        )

    # ------------------------------------------------------------------ embeddings
    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    @property
    def seq_len(self) -> int:
        """Length of the longest prompt (SOS..EOS): sequences are truncated to it."""
        return int(self.token_ids.shape[1])

    @torch.no_grad()
    def embed_fixed(self, token_embedding: nn.Module) -> torch.Tensor:
        """Embeddings of the prompt tokens from ``token_embedding`` ([n_cls, seq_len, d])."""
        return token_embedding(self.token_ids).detach()

    def set_token_embedding(self, token_embedding: nn.Module) -> None:
        """Cache the fixed-token embeddings from the text tower the prompts run through.

        Call it once the table is final (for a quantized student: after calibration).
        """
        self.fixed_embeds = self.embed_fixed(token_embedding).float()

    def forward(self, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings [n_cls, seq_len, d]: ``fixed`` (default: the cached buffer) with
        the context vectors written into their positions (differentiable w.r.t. the context)."""
        fixed = self.fixed_embeds if fixed is None else fixed
        if fixed is None:
            raise RuntimeError(
                "PromptLearner has no token embeddings yet: call "
                "set_token_embedding(model.token_embedding) "
                "(for a quantized student, after it is calibrated)"
            )
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        index = self.ctx_slot.unsqueeze(-1).expand(-1, -1, ctx.shape[-1])
        placed = ctx.gather(1, index).to(fixed.dtype)
        return torch.where(self.ctx_mask.unsqueeze(-1), placed, fixed)

    def _check_loaded_ctx(
        self, module: nn.Module, state_dict: dict, prefix: str, *_: object
    ) -> None:
        """A load-state-dict pre-hook: a context of another shape fails in one clear line."""
        key = prefix + "ctx"
        if key in state_dict and state_dict[key].shape != self.ctx.shape:
            raise ValueError(
                f"learned context has shape {tuple(state_dict[key].shape)} but this prompt learner "
                f"expects {tuple(self.ctx.shape)} (n_ctx={self.n_ctx}, "
                f"class_specific={self.class_specific}, "
                f"{self.n_cls} classes); match n_ctx/ctx_init and class_specific to the checkpoint"
            )

    def extra_repr(self) -> str:
        return (
            f"n_cls={self.n_cls}, n_ctx={self.n_ctx}, class_specific={self.class_specific}, "
            f"position={self.class_token_position}, seq_len={self.seq_len}, "
            f"shared_prefix={self.shared_prefix_length}"
        )
