"""Presets, per-group overrides and their validation."""

from __future__ import annotations

import pytest

from p4q_lightning.quant import ALL_GROUPS, PRESETS, GroupSpec, QuantSpec, get_spec


def _bits(spec: QuantSpec) -> dict[str, tuple[int | None, int | None]]:
    return {g: (s.w_bits, s.a_bits) for g, s in spec.groups.items()}


def test_p4q_448_matches_the_official_setting() -> None:
    """P4Q_NOTES section 2: patch-embedding weight and pixels at 4 bits; in_proj, out_proj,
    c_fc, c_proj weights and the adapter at 8 bits; quantized activations: attention input,
    c_fc input, c_proj input (8 bits, OMSE); q/k/v, scores, embeddings in float."""
    spec = get_spec("p4q-448")
    expected = {
        "vision.patch_embed": (4, 4),
        "text.token_embedding": (None, None),
        "adapter": (8, 8),
    }
    for tower in ("vision", "text"):
        expected |= {
            f"{tower}.attn_qkv": (8, 8),
            f"{tower}.attn_out": (8, None),
            f"{tower}.attn_internals": (None, None),
            f"{tower}.mlp_fc": (8, 8),
            f"{tower}.mlp_proj": (8, 8),
        }
    assert _bits(spec) == expected
    for g, s in spec.groups.items():
        assert s.w_observer == "minmax", g
        if s.a_bits is not None:
            assert s.a_observer == "omse", g


@pytest.mark.parametrize(
    "preset,w,a", [("w8a8", 8, 8), ("w6a6", 6, 6), ("w4a8", 4, 8), ("w4a4", 4, 4)]
)
def test_uniform_presets(preset: str, w: int, a: int) -> None:
    spec = get_spec(preset)
    for tower in ("vision", "text"):
        for g in ("attn_qkv", "attn_out", "mlp_fc", "mlp_proj"):
            assert _bits(spec)[f"{tower}.{g}"] == (w, a)
        assert _bits(spec)[f"{tower}.attn_internals"] == (None, a)
    assert _bits(spec)["vision.patch_embed"] == (w, a)
    assert _bits(spec)["text.token_embedding"] == (w, None)  # its input is token ids
    assert set(spec.groups) == set(ALL_GROUPS)


def test_fp_preset_is_float_everywhere() -> None:
    assert get_spec("fp").is_float
    assert set(PRESETS) == {"fp", "w8a8", "w6a6", "w4a8", "w4a4", "p4q-448", "p4q-official"}


def test_overrides_apply_to_one_group_or_both_towers() -> None:
    spec = get_spec(
        "w4a4",
        overrides={
            "attn_internals": {"a_bits": 8, "softmax_quantizer": "log2"},
            "vision.patch_embed": {"w_bits": 8, "a_bits": None},
        },
    )
    for tower in ("vision", "text"):
        assert spec[f"{tower}.attn_internals"].a_bits == 8
        assert spec[f"{tower}.attn_internals"].softmax_quantizer == "log2"
    assert _bits(spec)["vision.patch_embed"] == (8, None)
    assert _bits(spec)["vision.mlp_fc"] == (4, 4)
    assert spec.name == "w4a4+custom"
    assert get_spec("w4a4")["vision.attn_internals"].a_bits == 4, "presets are not mutated"


def test_spec_round_trips_through_its_dict_form() -> None:
    spec = get_spec(
        "p4q-448", overrides={"mlp_fc": {"a_observer": "percentile", "percentile": 99.9}}
    )
    again = get_spec(spec.to_dict())
    assert again == spec
    assert get_spec(spec) == spec and get_spec(spec) is not spec


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 64, -4, 4.0, "8", True])
def test_bits_outside_the_supported_set_are_rejected(bits: object) -> None:
    with pytest.raises(ValueError, match=r"2\.\.8, or 16/32"):
        GroupSpec(w_bits=bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2\.\.8, or 16/32"):
        get_spec("w8a8", overrides={"mlp_fc": {"a_bits": bits}})


@pytest.mark.parametrize("bits", [16, 32, None])
def test_16_32_and_null_mean_float(bits: int | None) -> None:
    g = GroupSpec(w_bits=bits, a_bits=bits)
    assert g.w_bits is None and g.a_bits is None and g.is_float


def test_unknown_group_in_an_override_gets_a_hint() -> None:
    with pytest.raises(
        ValueError, match=r"unknown quantization group 'mlp_fcc'.*Did you mean.*mlp_fc"
    ):
        get_spec("w4a4", overrides={"mlp_fcc": {"w_bits": 8}})
    with pytest.raises(
        ValueError, match=r"unknown quantization group 'visual.attn_qkv'.*vision.attn_qkv"
    ):
        get_spec("w4a4", overrides={"visual.attn_qkv": {"w_bits": 8}})
    with pytest.raises(ValueError, match="unknown quantization group"):
        QuantSpec(groups={"vision.ffn": GroupSpec()})


def test_unknown_field_preset_and_observer_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bit'\]"):
        get_spec("w4a4", overrides={"mlp_fc": {"bit": 8}})
    with pytest.raises(ValueError, match="unknown quantization preset 'w4a3'.*Did you mean"):
        get_spec("w4a3")
    with pytest.raises(ValueError, match="a_observer"):
        GroupSpec(a_observer="ema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w_observer"):
        GroupSpec(w_observer="omse")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        get_spec(42)  # type: ignore[arg-type]
