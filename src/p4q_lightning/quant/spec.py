"""Bit settings by layer group, and the named presets.

A CLIP student is quantized group by group: each tower (``vision``, ``text``) has the groups
in :data:`TOWER_GROUPS`, and the image-feature adapter is its own group. A :class:`QuantSpec`
maps every full group name (``"vision.mlp_fc"``, ``"text.attn_internals"``, ``"adapter"``) to
a :class:`GroupSpec`. Presets are built here; YAML overrides are merged by :func:`get_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FLOAT_BITS = (16, 32)
MIN_BITS, MAX_BITS = 2, 8

TOWERS = ("vision", "text")
TOWER_GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("patch_embed", "attn_qkv", "attn_out", "attn_internals", "mlp_fc", "mlp_proj"),
    "text": ("token_embedding", "attn_qkv", "attn_out", "attn_internals", "mlp_fc", "mlp_proj"),
}
ALL_GROUPS: tuple[str, ...] = tuple(
    f"{tower}.{group}" for tower in TOWERS for group in TOWER_GROUPS[tower]
) + ("adapter",)

WeightObserver = Literal["minmax", "percentile", "mse"]
ActObserver = Literal["minmax", "percentile", "omse", "mse"]
WeightGrid = Literal["restricted", "official"]
ActGrid = Literal["zero_exact", "official"]
ScoreOn = Literal["sample", "last_batch"]


def _check_bits(bits: int | None, what: str) -> int | None:
    """Return ``None`` for float (None, 16, 32), else validate the integer bit width."""
    if bits is None or bits in FLOAT_BITS:
        return None
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what}={bits!r} is not a supported bit width: use an integer in "
            f"{MIN_BITS}..{MAX_BITS}, or 16/32 (or null) to keep the tensor in float."
        )
    return bits


@dataclass
class GroupSpec:
    """Quantization of one layer group.

    Args:
        w_bits: weight bits (2..8), or None/16/32 for float. Weights are symmetric, per output
            channel (per row for the token-embedding table).
        a_bits: bits of the group's input activation (2..8), or None/16/32 for float.
            Activations are asymmetric with a zero point. For ``attn_internals`` this covers
            q, k, v and the post-softmax probabilities.
        w_observer: how the weight clip range is chosen: ``minmax``, ``percentile`` or ``mse``.
        a_observer: how activation ranges are chosen from calibration data: ``minmax``,
            ``percentile``, ``omse`` (the official P4Q/FQ-ViT shrink search) or ``mse``.
        a_per_channel: per-channel activation ranges instead of per tensor (the last dim;
            the RGB channels for the patch embedding's pixel input). OMSE then keeps one
            shrink factor shared by all channels, as the official code does.
        softmax_quantizer: ``uniform`` or ``log2`` for attention probabilities.
        percentile: the upper percentile used by the percentile observers.
        w_grid: ``restricted`` (codes +-(2^(b-1)-1), scale max|w|/(2^(b-1)-1)) or ``official``
            (codes -2^(b-1)..2^(b-1)-1, scale max|w|/(2^(b-1)-0.5), the P4Q code's grid).
        a_grid: ``zero_exact`` (ranges widened to contain 0) or ``official`` (range as found,
            zero point clamped), see :data:`p4q_lightning.quant.qmath.ACT_GRIDS`.
        a_score_on: data the search observers (percentile, OMSE, MSE) score candidates on:
            ``sample`` (a bounded uniform sample of every batch) or ``last_batch`` (all of the
            last calibration batch, as the official code does; the min/max still come from
            every batch).
    """

    w_bits: int | None = None
    a_bits: int | None = None
    w_observer: WeightObserver = "minmax"
    a_observer: ActObserver = "omse"
    a_per_channel: bool = False
    softmax_quantizer: Literal["uniform", "log2"] = "uniform"
    percentile: float = 99.99
    w_grid: WeightGrid = "restricted"
    a_grid: ActGrid = "zero_exact"
    a_score_on: ScoreOn = "sample"

    def __post_init__(self) -> None:
        self.w_bits = _check_bits(self.w_bits, "w_bits")
        self.a_bits = _check_bits(self.a_bits, "a_bits")
        if self.w_observer not in ("minmax", "percentile", "mse"):
            raise ValueError(f"w_observer={self.w_observer!r}: use one of minmax, percentile, mse")
        if self.a_observer not in ("minmax", "percentile", "omse", "mse"):
            raise ValueError(
                f"a_observer={self.a_observer!r}: use one of minmax, percentile, omse, mse"
            )
        if self.softmax_quantizer not in ("uniform", "log2"):
            raise ValueError(f"softmax_quantizer={self.softmax_quantizer!r}: use uniform or log2")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must lie in (50, 100]")
        for name, value, allowed in (
            ("w_grid", self.w_grid, ("restricted", "official")),
            ("a_grid", self.a_grid, ("zero_exact", "official")),
            ("a_score_on", self.a_score_on, ("sample", "last_batch")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    def label(self) -> str:
        """Short form such as ``w4a8`` or ``fp``."""
        if self.is_float:
            return "fp"
        w = f"w{self.w_bits}" if self.w_bits else "wfp"
        a = f"a{self.a_bits}" if self.a_bits else "afp"
        return w + a


@dataclass
class QuantSpec:
    """Bit settings for every layer group of a CLIP student (see :data:`ALL_GROUPS`).

    ``float_weight_calibration``: observe activation ranges with the float weights and
    quantize the weights afterwards (the official code's order), instead of observing the
    activations the quantized weights produce.
    """

    groups: dict[str, GroupSpec] = field(default_factory=dict)
    name: str = "custom"
    float_weight_calibration: bool = False

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in ALL_GROUPS]
        if unknown:
            raise ValueError(_unknown_group_message(unknown[0]))
        for g in ALL_GROUPS:
            self.groups.setdefault(g, GroupSpec())

    def __getitem__(self, group: str) -> GroupSpec:
        if group not in self.groups:
            raise KeyError(_unknown_group_message(group))
        return self.groups[group]

    @property
    def is_float(self) -> bool:
        return all(g.is_float for g in self.groups.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": {k: dataclasses.asdict(v) for k, v in self.groups.items()},
            "float_weight_calibration": self.float_weight_calibration,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        groups = {k: GroupSpec(**v) for k, v in data["groups"].items()}
        return cls(
            groups=groups,
            name=data.get("name", "custom"),
            float_weight_calibration=bool(data.get("float_weight_calibration", False)),
        )


def _unknown_group_message(group: str) -> str:
    close = difflib.get_close_matches(
        group, ALL_GROUPS + tuple(TOWER_GROUPS["vision"]) + ("token_embedding",), n=3
    )
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown quantization group {group!r}.{hint} Valid groups: {', '.join(ALL_GROUPS)}; "
        "a group name without a tower prefix (e.g. 'mlp_fc') applies to both towers."
    )


def _uniform(w_bits: int | None, a_bits: int | None, name: str, **kw: Any) -> QuantSpec:
    """Every linear/conv weight and its input activation at the stated bits."""
    groups: dict[str, GroupSpec] = {}
    for tower in TOWERS:
        for g in TOWER_GROUPS[tower]:
            if g == "token_embedding":
                groups[f"{tower}.{g}"] = GroupSpec(w_bits=w_bits, a_bits=None, **kw)
            elif g == "attn_internals":
                groups[f"{tower}.{g}"] = GroupSpec(w_bits=None, a_bits=a_bits, **kw)
            else:
                groups[f"{tower}.{g}"] = GroupSpec(w_bits=w_bits, a_bits=a_bits, **kw)
    groups["adapter"] = GroupSpec(w_bits=w_bits, a_bits=a_bits, **kw)
    return QuantSpec(groups=groups, name=name)


def _p4q_448() -> QuantSpec:
    """The tensors and bit widths of the official "4-4-8" setting, with our own calibration.

    Only the patch-embedding conv weight and the pixel input use 4 bits; every transformer
    linear weight (in_proj, out_proj, c_fc, c_proj) in both towers and the adapter use 8 bits.
    The quantized activations are exactly those the official code quantizes: the attention
    input (before in_proj) and the inputs of c_fc and c_proj; the out_proj input, q/k/v,
    attention scores, embeddings and norms stay in float. A simplification of the official
    quantizer (per-tensor activation ranges, restricted weight grid, ranges observed behind
    quantized weights): use ``p4q-official`` to reproduce the official code's numbers.
    """
    groups: dict[str, GroupSpec] = {}
    for tower in TOWERS:
        for g in ("attn_qkv", "mlp_fc", "mlp_proj"):
            groups[f"{tower}.{g}"] = GroupSpec(w_bits=8, a_bits=8, a_observer="omse")
        groups[f"{tower}.attn_out"] = GroupSpec(w_bits=8, a_bits=None)
    groups["vision.patch_embed"] = GroupSpec(w_bits=4, a_bits=4, a_observer="omse")
    groups["adapter"] = GroupSpec(w_bits=8, a_bits=8, a_observer="omse")
    return QuantSpec(groups=groups, name="p4q-448")


def _p4q_official() -> QuantSpec:
    """The official P4Q code's "4-4-8" quantizer, calibration included (docs/official_quantizer.md).

    Same tensors and bits as ``p4q-448``; in addition, as in the official code: one activation
    range per channel (the pixel input per RGB channel, block activations per feature, the
    adapter too) with OMSE's single shared shrink factor scored on the last calibration batch,
    the official weight and activation grids, and ranges observed with float weights.
    """
    official = {
        "a_observer": "omse",
        "a_per_channel": True,
        "w_grid": "official",
        "a_grid": "official",
        "a_score_on": "last_batch",
    }
    groups: dict[str, GroupSpec] = {}
    for tower in TOWERS:
        for g in ("attn_qkv", "mlp_fc", "mlp_proj"):
            groups[f"{tower}.{g}"] = GroupSpec(w_bits=8, a_bits=8, **official)
        groups[f"{tower}.attn_out"] = GroupSpec(w_bits=8, a_bits=None, **official)
    groups["vision.patch_embed"] = GroupSpec(w_bits=4, a_bits=4, **official)
    groups["adapter"] = GroupSpec(w_bits=8, a_bits=8, **official)
    return QuantSpec(groups=groups, name="p4q-official", float_weight_calibration=True)


PRESETS = {
    "fp": lambda: QuantSpec(name="fp"),
    "w8a8": lambda: _uniform(8, 8, "w8a8"),
    "w6a6": lambda: _uniform(6, 6, "w6a6"),
    "w4a8": lambda: _uniform(4, 8, "w4a8"),
    "w4a4": lambda: _uniform(4, 4, "w4a4"),
    "p4q-448": _p4q_448,
    "p4q-official": _p4q_official,
}


def get_spec(
    spec: str | QuantSpec | Mapping[str, Any],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> QuantSpec:
    """Resolve a preset name, a :class:`QuantSpec` or its dict form, then apply overrides.

    ``overrides`` maps a group (``"text.attn_internals"``, or ``"attn_internals"`` for both
    towers) to the :class:`GroupSpec` fields to change, e.g. ``{"mlp_fc": {"a_bits": 8}}``.
    """
    if isinstance(spec, QuantSpec):
        base = QuantSpec.from_dict(spec.to_dict())
    elif isinstance(spec, str):
        if spec not in PRESETS:
            close = difflib.get_close_matches(spec, PRESETS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown quantization preset {spec!r}.{hint} Presets: {', '.join(PRESETS)}."
            )
        base = PRESETS[spec]()
    elif isinstance(spec, Mapping):
        base = QuantSpec.from_dict(spec)
    else:
        raise TypeError(
            f"quantization spec must be a preset name, QuantSpec or dict, not {type(spec)}"
        )
    for key, changes in (overrides or {}).items():
        targets = (
            [key]
            if key in ALL_GROUPS
            else [f"{t}.{key}" for t in TOWERS if f"{t}.{key}" in ALL_GROUPS]
        )
        if not targets:
            raise ValueError(_unknown_group_message(key))
        for target in targets:
            fields = dataclasses.asdict(base.groups[target])
            bad = set(changes) - set(fields)
            if bad:
                raise ValueError(
                    f"override of {key!r} sets unknown field(s) {sorted(bad)}; "
                    f"GroupSpec fields are {sorted(fields)}"
                )
            fields.update(changes)
            base.groups[target] = GroupSpec(**fields)
    if overrides:
        base.name = f"{base.name}+custom"
    return base
