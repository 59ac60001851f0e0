"""Validate a low-bit file's metadata and tensors before anything is built from them.

The checksum only proves the file is intact; whoever edits a file can recompute it. So every
field :func:`~p4q_lightning.export.load_lowbit` uses is checked here as untrusted data: types,
bit widths within the quantization spec's range, shapes that fit each other, finite tensors,
and a model description that cannot make open_clip fetch or import anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from p4q_lightning.export.adapters import check_config
from p4q_lightning.export.format import LowBitFormatError
from p4q_lightning.export.packing import packed_nbytes
from p4q_lightning.export.writer import HEAD
from p4q_lightning.quant import QuantSpec
from p4q_lightning.quant.spec import MAX_BITS, MIN_BITS

#: dtypes of constant buffers recorded as ``zeros`` (the file names one of these, nothing else)
ZERO_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
#: open_clip config keys that would load other code or download weights
FORBIDDEN_CONFIG_KEYS = ("hf_model_name", "hf_tokenizer_name", "timm_model_name", "hf_proj_type")
MAX_ELEMENTS = 1 << 34


def _fail(path: Any, problem: str) -> LowBitFormatError:
    return LowBitFormatError(
        f"{path}: {problem}. The file was edited or written by another tool; re-export it "
        "from the run"
    )


def _shape(value: Any) -> list[int] | None:
    if not isinstance(value, list) or len(value) > 8:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        return None
    return value if math.prod(value) <= MAX_ELEMENTS else None


def _check_model(path: Any, model: Any) -> None:
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise _fail(path, "metadata 'model' must name an open_clip model")
    name = model["name"]
    if not name or ":" in name or "/" in name or "\\" in name or name.startswith("."):
        raise _fail(path, f"model name {name!r} is not a plain open_clip model name")
    config = model.get("config")
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise _fail(path, "metadata 'model.config' must be an open_clip config object")
    for part in (config, config.get("vision_cfg") or {}, config.get("text_cfg") or {}):
        if not isinstance(part, Mapping):
            raise _fail(path, "metadata 'model.config' towers must be objects")
        bad = [k for k in FORBIDDEN_CONFIG_KEYS if part.get(k)]
        if bad:
            raise _fail(path, f"model config names {bad[0]}, which would load outside code")


def _check_codes(path: Any, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    quantized = info.get("quantized")
    if not isinstance(quantized, Mapping):
        raise _fail(path, "metadata 'quantized' must map tensor names to {bits, shape}")
    for key, q in quantized.items():
        if not isinstance(q, Mapping) or set(q) != {"bits", "shape"}:
            raise _fail(path, f"quantized entry {key!r} must be {{bits, shape}}")
        bits, shape = q["bits"], _shape(q["shape"])
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise _fail(path, f"{key} claims {bits!r} bits; codes hold {MIN_BITS}..{MAX_BITS}")
        if shape is None:
            raise _fail(path, f"{key} has an invalid shape {q['shape']!r}")
        t = tensors.get(key)
        if t is None or t.dtype not in (torch.int8, torch.uint8):
            raise _fail(path, f"{key} is listed as integer codes but not stored as int8/uint8")
        if t.numel() != packed_nbytes(math.prod(shape), bits):
            raise _fail(path, f"{key} stores {t.numel()} bytes, not {bits}-bit codes of {shape}")
    zeros = info.get("zeros", {})
    if not isinstance(zeros, Mapping):
        raise _fail(path, "metadata 'zeros' must map buffer names to {shape, dtype, value}")
    for key, z in zeros.items():
        if not isinstance(z, Mapping) or _shape(z.get("shape")) is None:
            raise _fail(path, f"constant buffer {key!r} has no valid shape")
        if z.get("dtype") not in ZERO_DTYPES:
            raise _fail(path, f"constant buffer {key!r} has dtype {z.get('dtype')!r}")
        value = z.get("value", 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"constant buffer {key!r} has a non-numeric value")


def _check_head(path: Any, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    names = info.get("classnames")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise _fail(path, "metadata 'classnames' must be a list of strings")
    text = tensors.get(HEAD + "text_features")
    if text is not None:
        if text.dim() != 2:
            raise _fail(path, f"text features must be [classes, dim], got {list(text.shape)}")
        if names is None or len(names) != text.shape[0]:
            n = 0 if names is None else len(names)
            raise _fail(path, f"{n} class names for {text.shape[0]} text-feature rows")
        if HEAD + "logit_scale" not in tensors or tensors[HEAD + "logit_scale"].numel() != 1:
            raise _fail(path, "a classifier head needs one logit scale")
    scale = tensors.get(HEAD + "logit_scale")
    if scale is not None and not float(scale.reshape(-1)[0]) > 0:
        raise _fail(path, f"logit scale {float(scale.reshape(-1)[0])} is not positive")


def validate(path: Any, tensors: Mapping[str, torch.Tensor], info: Any) -> QuantSpec:
    """Check ``info`` and ``tensors`` of the file at ``path``; return its quantization spec.

    Raises :class:`LowBitFormatError` naming the first problem.
    """
    if not isinstance(info, Mapping):
        raise _fail(path, "metadata is not a JSON object")
    _check_model(path, info.get("model"))
    spec_data = info.get("spec")
    if not isinstance(spec_data, Mapping) or not isinstance(spec_data.get("groups"), Mapping):
        raise _fail(path, "metadata 'spec' must hold the quantization groups")
    try:
        spec = QuantSpec.from_dict(spec_data)
    except (TypeError, ValueError, KeyError) as e:
        raise _fail(path, f"its quantization spec is invalid ({e})") from e
    _check_codes(path, tensors, info)
    _check_head(path, tensors, info)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"tensor {name} holds NaN or infinite values")
    if info.get("adapter") is not None:
        adapter = check_config(info["adapter"])
        init_spec = adapter["init"].get("spec")
        if adapter["kind"] == "low_bit_adapter" and isinstance(init_spec, Mapping):
            stored = {k: init_spec.get(k) for k in ("w_bits", "a_bits")}
            want = {"w_bits": spec["adapter"].w_bits, "a_bits": spec["adapter"].a_bits}
            if stored != want:
                raise _fail(path, f"adapter bits {stored} differ from the spec's {want}")
    return spec
