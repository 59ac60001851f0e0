"""The methods P4QModule runs and what each one does: the one table every file reads.

``p4q`` trains prompts and a low-bit adapter on the PTQ student with distillation from the float
teacher; ``coop`` trains prompts on the float model; ``ptq`` and ``zeroshot`` classify with the
template classifier of the PTQ student and the float model, without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Method = Literal["p4q", "coop", "ptq", "zeroshot"]


@dataclass(frozen=True)
class MethodTraits:
    """What a method does; code asks these questions instead of comparing names."""

    name: str
    trains_prompts: bool  # learned CoOp context through the student's text tower
    quantized: bool  # the student is the PTQ copy of the teacher (else the teacher itself)
    distils: bool  # the loss adds distillation from the float teacher
    uses_adapter: bool  # a low-bit adapter on the image features

    @property
    def trains(self) -> bool:
        """Whether ``fit`` has parameters to train."""
        return self.trains_prompts or self.uses_adapter


METHODS: dict[str, MethodTraits] = {
    t.name: t
    for t in (
        #            name        prompts quantized distils adapter
        MethodTraits("p4q", True, True, True, True),
        MethodTraits("coop", True, False, False, False),
        MethodTraits("ptq", False, True, False, False),
        MethodTraits("zeroshot", False, False, False, False),
    )
}
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
