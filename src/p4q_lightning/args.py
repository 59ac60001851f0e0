"""P4QModule's options in small groups, nested in YAML as ``model.prompt.n_ctx`` and so on.

Each group is a frozen dataclass: LightningCLI (jsonargparse) reads the types and the ``Args:``
docstrings for parsing and ``--help``, and Python callers pass an instance or a plain dict
(which is what a checkpoint's hyperparameters hold). Values are checked when a group is made,
so a bad option fails in one line before any model is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar


@dataclass(frozen=True)
class PromptArgs:
    """The learned CoOp prompt and its pass through the text tower.

    Args:
        n_ctx: number of learned prompt context vectors (CoOp: 16).
        ctx_init: initialise the context from this phrase (e.g. ``a photo of a``; sets n_ctx).
        class_specific: one context per class (CoOp's CSC) instead of one shared context.
        class_token_position: where the class name sits in the prompt: end, middle or front.
        init_std: std of the random context initialisation (when ctx_init is None).
        chunk_size: classes per text-tower chunk (None: all at once).
        checkpointing: recompute text-tower activations in the backward pass (saves memory;
            with a shared prefix each block's MLP widening half, else whole chunks).
    """

    n_ctx: int = 16
    ctx_init: str | None = None
    class_specific: bool = False
    class_token_position: Literal["end", "middle", "front"] = "end"
    init_std: float = 0.02
    chunk_size: int | None = None
    checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_choice("prompt.class_token_position", self.class_token_position, "end middle front")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"prompt.chunk_size={self.chunk_size}: use a positive size or null")


@dataclass(frozen=True)
class AdapterArgs:
    """The low-bit adapter on the student's image features (``p4q`` only; its bits are the
    quantization spec's ``adapter`` group).

    Args:
        enabled: train the adapter (false: prompts only).
        reduction: the adapter's bottleneck is the embedding width / this.
        ratio: blend of adapted and original image features (0: adapter off).
        bias: give the adapter's linear layers a bias.
    """

    enabled: bool = True
    reduction: int = 4
    ratio: float = 0.2
    bias: bool = True

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"adapter.reduction={self.reduction}: use a positive divisor")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"adapter.ratio={self.ratio}: use a blend between 0 and 1")


@dataclass(frozen=True)
class LossArgs:
    """Cross-entropy on the labels plus distillation from the float teacher.

    Args:
        ce_weight: weight of the cross-entropy loss on the labels.
        distill_weight: weight of the distillation loss from the float teacher (0: none).
        distill_kind: ``kd`` (standard, with temperature) or ``official`` (the official
            code's expression).
        temperature: softmax temperature of the ``kd`` distillation.
        teacher_text: the teacher's classifier: ``templates`` (mean template embedding) or
            ``prompt`` (the learned prompt through the float text tower).
        kg_weight: KgCoOp's lambda (``kgcoop`` only): weight of ``mean_k (1 - cos(w_k, w0_k))``
            between the learned prompt's and the hand-written prompt's class embeddings
            through the same student text tower (half the squared distance of the normalised
            embeddings, as KgCoOp's code computes it; 8.0 published).
    """

    ce_weight: float = 1.0
    distill_weight: float = 1.0
    distill_kind: Literal["kd", "official"] = "kd"
    temperature: float = 1.0
    teacher_text: Literal["templates", "prompt"] = "templates"
    kg_weight: float = 8.0

    def __post_init__(self) -> None:
        _check_choice("loss.distill_kind", self.distill_kind, "kd official")
        _check_choice("loss.teacher_text", self.teacher_text, "templates prompt")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature}: use a positive temperature")


@dataclass(frozen=True)
class OptimArgs:
    """SGD for the prompt, AdamW for the adapter, a constant warmup then a per-step cosine.

    Args:
        prompt_lr: SGD learning rate of the prompt context.
        prompt_momentum: SGD momentum of the prompt context.
        prompt_weight_decay: SGD weight decay of the prompt context.
        adapter_lr: AdamW learning rate of the adapter.
        adapter_weight_decay: AdamW weight decay of the adapter.
        adapter_eps: AdamW epsilon of the adapter.
        cache_lr: AdamW learning rate of Tip-Adapter-F's cache keys (1e-3 published).
        cache_eps: AdamW epsilon of the cache keys (1e-4 as Tip-Adapter-F's code).
        cache_weight_decay: AdamW weight decay of the cache keys (torch's default, as there).
        lora_lr: AdamW learning rate of CLIP-LoRA's factors (2e-4 published).
        lora_weight_decay: AdamW weight decay of the LoRA factors (1e-2 as CLIP-LoRA's code).
        warmup_epochs: epochs of constant-lr warmup before the per-step cosine schedule.
        warmup_lr: the learning rate during warmup.
    """

    prompt_lr: float = 2e-3
    prompt_momentum: float = 0.9
    prompt_weight_decay: float = 5e-4
    adapter_lr: float = 1e-3
    adapter_weight_decay: float = 1e-2
    adapter_eps: float = 1e-8
    cache_lr: float = 1e-3
    cache_eps: float = 1e-4
    cache_weight_decay: float = 1e-2
    lora_lr: float = 2e-4
    lora_weight_decay: float = 1e-2
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs={self.warmup_epochs}: use 0 or more")


@dataclass(frozen=True)
class FeatureArgs:
    """Cached image features: both image towers run once per augmented view instead of on
    every step (the towers are frozen, so the features of a view never change).

    Args:
        views: augmented views of the training set whose image features are cached
            (0 = live augmentation: both image towers run on every step).
        cache_dir: directory to keep the feature cache between runs (None: memory only).
    """

    views: int = 10
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.views < 0:
            raise ValueError(
                f"features.views={self.views}: use 0 (live augmentation) or a positive count"
            )


@dataclass(frozen=True)
class TipArgs:
    """Tip-Adapter's cache logits ``alpha * exp(-beta * (1 - f . K)) @ V`` (``tip_adapter``,
    ``tip_adapter_f``): K the few-shot image features, V their one-hot labels.

    Args:
        alpha: weight of the cache logits before (or without) the search.
        beta: sharpness of the affinity before (or without) the search.
        search: grid-search alpha and beta on the validation split after the cache is built
            (Tip-Adapter) or trained (Tip-Adapter-F), as the paper does.
        search_beta_max: beta grid ``0.1 + i * (max - 0.1) / steps``, i < steps.
        search_alpha_max: alpha grid, the same way.
        search_beta_steps: points of the beta grid.
        search_alpha_steps: points of the alpha grid.
    """

    alpha: float = 1.0
    beta: float = 5.5
    search: bool = True
    search_beta_max: float = 7.0
    search_alpha_max: float = 3.0
    search_beta_steps: int = 200
    search_alpha_steps: int = 20

    def __post_init__(self) -> None:
        if self.beta < 0 or self.alpha < 0:
            raise ValueError(f"tip.alpha={self.alpha}, tip.beta={self.beta}: use values >= 0")
        if self.search_beta_steps < 1 or self.search_alpha_steps < 1:
            raise ValueError("tip.search_beta_steps and tip.search_alpha_steps must be >= 1")


@dataclass(frozen=True)
class LoRAArgs:
    """CLIP-LoRA's low-rank float factors on q, k and v of every attention block of both towers
    (``clip_lora`` only), over the frozen (quantized) projections.

    Args:
        rank: rank r of each factor pair (2 published).
        alpha: the update is ``alpha / rank * B(A(dropout(x)))`` (1 published).
        dropout: dropout on the factors' input while training (0.25 published).
    """

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: use a positive rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: use a probability in [0, 1)")


GROUPS: dict[str, type] = {
    "prompt": PromptArgs,
    "adapter": AdapterArgs,
    "loss": LossArgs,
    "optim": OptimArgs,
    "features": FeatureArgs,
    "tip": TipArgs,
    "lora": LoRAArgs,
}

T = TypeVar("T")


def as_group(cls: type[T], value: T | Mapping[str, Any] | None, name: str) -> T:
    """``value`` as a ``cls`` instance: an instance, a dict of its fields or None (defaults).

    ``name`` is the group's place in the config (``model.prompt``), for the error message."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of options, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(sorted(fields))}"
        )
    return cls(**value)


def _check_choice(name: str, value: str, choices: str) -> None:
    if value not in choices.split():
        raise ValueError(f"{name}={value!r}: use one of {', '.join(choices.split())}")
