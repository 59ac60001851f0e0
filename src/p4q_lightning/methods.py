"""The methods P4QModule runs and what each one does: the one table every file reads.

``p4q`` trains prompts and a low-bit adapter on the PTQ student with distillation from the float
teacher; ``coop`` trains prompts on the float model; ``ptq`` and ``zeroshot`` classify with the
template classifier of the PTQ student and the float model, without training.

The few-shot baselines run on the same student as ``p4q`` (the PTQ copy; ``quant: fp`` gives a
float copy): ``tip_adapter`` adds a training-free cache of the few-shot image features to the
template classifier, ``tip_adapter_f`` trains the cache keys, ``clip_lora`` trains low-rank
float factors on q, k, v of every attention block of both towers, and ``kgcoop`` is CoOp's prompt
with a pull toward the hand-written prompt's text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Method = Literal[
    "p4q", "coop", "ptq", "zeroshot", "tip_adapter", "tip_adapter_f", "clip_lora", "kgcoop"
]


@dataclass(frozen=True)
class MethodTraits:
    """What a method does; code asks these questions instead of comparing names."""

    name: str
    trains_prompts: bool  # learned CoOp context through the student's text tower
    quantized: bool  # the student is the PTQ copy of the teacher (else the teacher itself)
    distils: bool  # the loss adds distillation from the float teacher
    uses_adapter: bool  # a low-bit adapter on the image features
    tip_cache: bool = False  # Tip-Adapter's cache of few-shot image features (keys) and labels
    trains_cache: bool = False  # the cache keys train (Tip-Adapter-F)
    lora: bool = False  # low-rank float factors on q, k, v of every block of both towers
    anchors_prompt: bool = False  # KgCoOp: the learned text embedding is pulled toward the
    # hand-written prompt's (``loss.kg_weight``)
    export_refusal: str | None = None  # why the low-bit file cannot hold this method, if so

    @property
    def trains(self) -> bool:
        """Whether ``fit`` has parameters to train."""
        return self.trains_prompts or self.uses_adapter or self.trains_cache or self.lora

    @property
    def fits(self) -> bool:
        """Whether ``fit`` does anything: train, or (Tip-Adapter) build its cache."""
        return self.trains or self.tip_cache

    @property
    def fitted_state(self) -> str:
        """What ``fit`` produces, named in messages (the warning about evaluating without it)."""
        if self.trains_prompts:
            return "prompt and adapter" if self.uses_adapter else "prompt"
        if self.tip_cache:
            return "cache keys" if self.trains_cache else "cache"
        if self.lora:
            return "LoRA factors"
        return "nothing"

    @property
    def image_tower_trains(self) -> bool:
        """Whether the student's image features change during training (no feature cache)."""
        return self.lora

    @property
    def template_classifier(self) -> bool:
        """Whether the class embeddings are the template classifier (no learned prompt)."""
        return not self.trains_prompts


_TIP_REFUSAL = (
    "the low-bit file holds the student, prompt and adapter but has no slot for the "
    "Tip-Adapter cache (keys and one-hot values); use the run's checkpoint"
)
_LORA_REFUSAL = (
    "CLIP-LoRA's deployment form here is the float side branch (the rank-r factors stay float "
    "beside the int weights), which the low-bit file has no slot for; use the run's checkpoint "
    "(merging the factors and re-quantizing is measured by benchmarks/lora_merge.py, not exported)"
)

METHODS: dict[str, MethodTraits] = {
    t.name: t
    for t in (
        #            name        prompts quantized distils adapter
        MethodTraits("p4q", True, True, True, True),
        MethodTraits("coop", True, False, False, False),
        MethodTraits("ptq", False, True, False, False),
        MethodTraits("zeroshot", False, False, False, False),
        MethodTraits("tip_adapter", False, True, False, False, tip_cache=True,
                     export_refusal=_TIP_REFUSAL),
        MethodTraits("tip_adapter_f", False, True, False, False, tip_cache=True,
                     trains_cache=True, export_refusal=_TIP_REFUSAL),
        MethodTraits("clip_lora", False, True, False, False, lora=True,
                     export_refusal=_LORA_REFUSAL),
        MethodTraits("kgcoop", True, True, False, False, anchors_prompt=True),
    )
}  # fmt: skip
assert tuple(METHODS) == get_args(Method), "Method and METHODS must list the same names"


def traits(method: str) -> MethodTraits:
    """The traits of ``method``; an unknown name fails with the list of known ones."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}") from None


def quantized_methods() -> tuple[str, ...]:
    """Names of the methods with a low-bit student (what can be exported)."""
    return tuple(name for name, t in METHODS.items() if t.quantized)


def exportable_methods() -> tuple[str, ...]:
    """Names of the methods the low-bit file can hold (quantized, no export refusal)."""
    return tuple(n for n in quantized_methods() if METHODS[n].export_refusal is None)
