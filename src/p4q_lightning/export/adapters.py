"""The adapter kinds a low-bit file may name, and their validated constructor arguments.

A file never names code: it names a *kind* from :data:`ADAPTER_KINDS`, and the kind's own
validator turns the stored JSON arguments into a module. An unknown kind is refused unless the
caller of :func:`~p4q_lightning.export.load_lowbit` builds the adapter itself
(``adapter_factory``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from p4q_lightning.export.format import LowBitFormatError
from p4q_lightning.legacy import upgrade_adapter_config
from p4q_lightning.model.adapter import LowBitAdapter
from p4q_lightning.quant import GroupSpec

KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
LOW_BIT_ADAPTER = "low_bit_adapter"
MAX_DIM = 1 << 16


@dataclass(frozen=True)
class AdapterKind:
    """How one adapter class is described in a file (``describe``) and rebuilt (``build``)."""

    cls: type[nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[Mapping[str, Any]], nn.Module]


def _group_spec(value: Any, what: str) -> GroupSpec:
    fields = {f.name for f in dataclasses.fields(GroupSpec)}
    if not isinstance(value, Mapping) or set(value) - fields:
        raise LowBitFormatError(f"{what} must be an object with keys among {sorted(fields)}")
    try:
        return GroupSpec(**dict(value))
    except (TypeError, ValueError) as e:
        raise LowBitFormatError(f"{what} is not a valid quantization group: {e}") from e


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LowBitFormatError(f"{what}={value!r} must be an integer in {low}..{high}")
    return value


def _describe_low_bit(adapter: nn.Module) -> dict[str, Any]:
    assert isinstance(adapter, LowBitAdapter)
    hidden = adapter.fc1.out_features
    return {
        "dim": int(adapter.dim),
        "reduction": int(adapter.dim // hidden),
        "ratio": float(adapter.ratio),
        "bias": adapter.fc1.bias is not None,
        "spec": dataclasses.asdict(adapter.spec),
    }


def _build_low_bit(init: Mapping[str, Any]) -> nn.Module:
    what = f"adapter kind {LOW_BIT_ADAPTER!r}"
    expected = {"dim", "reduction", "ratio", "bias", "spec"}
    if set(init) != expected:
        raise LowBitFormatError(
            f"{what} needs exactly the arguments {sorted(expected)}, the file has {sorted(init)}"
        )
    dim = _int(init["dim"], "adapter dim", 1, MAX_DIM)
    reduction = _int(init["reduction"], "adapter reduction", 1, dim)
    ratio = init["ratio"]
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0)
    ):
        raise LowBitFormatError(f"adapter ratio={ratio!r} must be a number in [0, 1]")
    if not isinstance(init["bias"], bool):
        raise LowBitFormatError(f"adapter bias={init['bias']!r} must be true or false")
    spec = _group_spec(init["spec"], "adapter spec")
    return LowBitAdapter(dim, reduction, float(ratio), init["bias"], spec)


#: Every adapter class a low-bit file can ask for, by kind name.
ADAPTER_KINDS: dict[str, AdapterKind] = {
    LOW_BIT_ADAPTER: AdapterKind(LowBitAdapter, _describe_low_bit, _build_low_bit),
}


def kind_of(adapter: nn.Module) -> str | None:
    """The registered kind of ``adapter``'s class (None if it has none)."""
    for name, kind in ADAPTER_KINDS.items():
        if type(adapter) is kind.cls:
            return name
    return None


def describe(adapter: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., "init": ...}`` for a registered adapter (what an export stores)."""
    name = kind_of(adapter)
    if name is None:
        raise LowBitFormatError(
            f"{type(adapter).__name__} is not a registered adapter kind "
            f"({', '.join(ADAPTER_KINDS)}); pass adapter_config={{'kind': 'my_kind', 'init': "
            "{...}} and rebuild it at load with load_lowbit(..., adapter_factory=...)"
        )
    return {"kind": name, "init": ADAPTER_KINDS[name].describe(adapter)}


def check_config(config: Any) -> dict[str, Any]:
    """Validate the shape of a stored adapter description (``kind`` + JSON ``init``)."""
    config = upgrade_adapter_config(config, LOW_BIT_ADAPTER)  # format 1 (legacy.py)
    if not isinstance(config, Mapping) or set(config) != {"kind", "init"}:
        keys = sorted(config) if isinstance(config, Mapping) else type(config).__name__
        raise LowBitFormatError(
            f"adapter description must be {{'kind': name, 'init': {{...}}}}, got {keys}; "
            "files naming an import 'target' are refused (no code is ever loaded from a file)"
        )
    kind, init = config["kind"], config["init"]
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise LowBitFormatError(f"adapter kind {kind!r} is not a plain lower-case name")
    if not isinstance(init, Mapping):
        raise LowBitFormatError("adapter 'init' must be a JSON object of constructor arguments")
    return {"kind": kind, "init": dict(init)}


def build(
    config: Mapping[str, Any], factory: Callable[[dict[str, Any]], nn.Module] | None = None
) -> nn.Module:
    """The adapter a file describes: ``factory(init)`` if given, else its registered kind."""
    config = check_config(config)
    if factory is not None:
        return factory(config["init"])
    kind = ADAPTER_KINDS.get(config["kind"])
    if kind is None:
        raise LowBitFormatError(
            f"adapter kind {config['kind']!r} is not registered ({', '.join(ADAPTER_KINDS)}); "
            "pass adapter_factory= to load_lowbit to build it yourself"
        )
    return kind.build(config["init"])
