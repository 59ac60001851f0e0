"""Write a calibrated low-bit CLIP student (plus its classifier head) as real integers.

Every enabled weight quantizer's weight becomes integer codes (int8, or int4 packed two per
byte) next to its per-channel scale; all-zero weight zero points are dropped; everything else in
the state dict (LayerNorms, biases, embeddings, projections, activation-quantizer ranges) is kept
as it is. The classifier head (class names, text features of the learned prompt, logit scale,
the prompt context, the adapter) rides along, so :func:`load_lowbit` can classify on its own.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p4q_lightning.export.format import ExportMismatchError, write_container
from p4q_lightning.export.packing import pack_codes, packed_nbytes
from p4q_lightning.quant import quant_modules, quant_spec_of

log = logging.getLogger(__name__)

STUDENT, ADAPTER, HEAD = "student.", "adapter.", "head."


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: its path, its size and the float32 size it replaces."""

    path: Path
    file_bytes: int
    float32_bytes: int

    @property
    def ratio(self) -> float:
        return self.float32_bytes / max(self.file_bytes, 1)


def versions() -> dict[str, str]:
    """Versions of the libraries an export depends on (stored in its metadata)."""
    out = {"torch": torch.__version__}
    for dist in ("open_clip_torch", "p4q_lightning", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def weight_key(name: str, module: nn.Module) -> str:
    """State-dict key of a quantized layer's weight (every one, attention's ``in_proj``
    included, is called ``weight``)."""
    return f"{name}.weight" if name else "weight"


def _grid_weight(
    name: str, module: nn.Module, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight on the grid, per-channel scale): what the module multiplies with at inference."""
    wq = module.weight_quantizer
    w = weight.detach().float().cpu()
    if wq.dynamic:  # trained weights (the adapter): quantize now, as the forward pass does
        scale = wq.minmax_scale(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.round(w / scale.view(shape)).clamp(wq.qmin, wq.qmax)
        return q * scale.view(shape), scale
    if not bool(module.weights_frozen):
        raise ExportMismatchError(
            f"{name}: weights are not quantized yet; calibrate the student "
            "(p4q_lightning.calibrate) before exporting it"
        )
    return w, wq.scale.detach().float().cpu()


def lowbit_state(
    model: nn.Module, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a quantized model's state into stored tensors and the info needed to rebuild it.

    Returns ``(tensors, info)`` with ``info = {"quantized": {key: {bits, shape}}, "zeros":
    {key: {shape, dtype, value}}}`` (constant buffers left out of the file); keys carry ``prefix``.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    quantized: dict[str, dict[str, Any]] = {}
    zeros: dict[str, dict[str, Any]] = {}
    for name, module in quant_modules(model):
        wq = module.weight_quantizer
        if not wq.enabled:
            continue
        key = weight_key(name, module)
        grid, scale = _grid_weight(name, module, state[key])
        shape = (-1,) + (1,) * (grid.dim() - 1)
        codes = torch.round(grid / scale.view(shape)).clamp(wq.qmin, wq.qmax).to(torch.int8)
        err = (codes.float() * scale.view(shape) - grid).abs().max()
        if float(err) > 1e-6 * float(grid.abs().max().clamp_min(1e-12)):
            raise ExportMismatchError(
                f"{name}: stored weight is not on its {wq.bits}-bit grid "
                f"(max error {float(err):.3g}); "
                "was the weight changed after calibration? Re-run p4q_lightning.calibrate"
            )
        state[key] = pack_codes(codes, wq.bits)
        quantized[prefix + key] = {"bits": wq.bits, "shape": list(grid.shape)}
        prefix_q = f"{name}.weight_quantizer." if name else "weight_quantizer."
        state[prefix_q + "scale"] = scale.to(state[prefix_q + "scale"].dtype)
    # constant buffers (zero points of symmetric quantizers; the unused scale of a disabled
    # one, e.g. the float token table's 49408 rows) are recorded, not stored
    for name, module in quant_modules(model):
        prefix_q = f"{name}.weight_quantizer." if name else "weight_quantizer."
        candidates = [("zero_point", 0)] + (
            [] if module.weight_quantizer.enabled else [("scale", 1)]
        )
        for leaf, value in candidates:
            key = prefix_q + leaf
            if key in state and bool((state[key] == value).all()):
                t = state.pop(key)
                zeros[prefix + key] = {
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "value": value,
                }
    tensors = {prefix + k: v for k, v in state.items()}
    return tensors, {"quantized": quantized, "zeros": zeros}


def float32_nbytes(model: nn.Module) -> int:
    """Bytes of the float32 open_clip state dict of the same architecture (its parameters)."""
    return 4 * sum(p.numel() for p in model.parameters())


def estimate_lowbit_nbytes(model: nn.Module) -> int:
    """Bytes of tensor data an export of ``model`` holds, without writing it (for tables)."""
    total = 0
    quantized = {}
    for name, module in quant_modules(model):
        if module.weight_quantizer.enabled:
            quantized[weight_key(name, module)] = module.weight_quantizer.bits
    disabled = {
        f"{name}.weight_quantizer.scale"
        for name, m in quant_modules(model)
        if not m.weight_quantizer.enabled
    }
    for key, value in model.state_dict().items():
        if key in quantized:
            total += packed_nbytes(value.numel(), quantized[key])
        elif not key.endswith("weight_quantizer.zero_point") and key not in disabled:
            total += value.numel() * value.element_size()
    return total


def _model_config(name: str, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if given is not None:
        return dict(given)
    import open_clip

    config = open_clip.get_model_config(name)
    return dict(config) if config is not None else None


def _adapter_info(adapter: nn.Module, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The adapter's stored description: a registered kind and JSON constructor arguments."""
    from p4q_lightning.export import adapters

    if config is None:
        return adapters.describe(adapter)
    if "target" in config:
        raise ExportMismatchError(
            "adapter_config names an import 'target'; low-bit files name a registered adapter "
            "kind instead: adapter_config={'kind': 'my_kind', 'init': {...}} (or omit it for "
            "a LowBitAdapter)"
        )
    try:
        return adapters.check_config(config)
    except ValueError as e:
        raise ExportMismatchError(str(e)) from e


def export_lowbit(
    path: str | os.PathLike[str],
    student: nn.Module,
    *,
    model_name: str,
    pretrained: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    classnames: list[str] | None = None,
    text_features: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor | None = None,
    prompt_ctx: torch.Tensor | None = None,
    adapter: nn.Module | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export a calibrated student from :func:`p4q_lightning.quantize` as a low-bit file.

    ``model_name``/``pretrained`` say how :func:`load_lowbit` rebuilds the architecture (the
    weights come from the file); ``model_config`` (the open_clip config dict, default: looked
    up by name) is stored too, so models registered from a JSON file load anywhere.
    ``text_features`` ([classes, dim], normalized) with
    ``classnames`` and ``logit_scale`` make the file a classifier; ``adapter`` is stored with
    its registered kind (a :class:`~p4q_lightning.model.adapter.LowBitAdapter` describes itself;
    any other module needs ``adapter_config = {"kind": "name", "init": {...}}`` and an
    ``adapter_factory`` at load). ``extra`` is free-form JSON (method, shots, dataset...).
    """
    spec = quant_spec_of(student)
    tensors, info = lowbit_state(student, STUDENT)
    if text_features is not None:
        if classnames is None or len(classnames) != text_features.shape[0]:
            raise ExportMismatchError(
                f"text_features has {text_features.shape[0]} rows but "
                f"{0 if classnames is None else len(classnames)} "
                "class names were given; pass one class name per text-feature row"
            )
        tensors[HEAD + "text_features"] = text_features.detach().float().cpu()
        scale = logit_scale if logit_scale is not None else student.logit_scale.exp()
        tensors[HEAD + "logit_scale"] = torch.as_tensor(scale).detach().float().cpu().reshape(())
    if prompt_ctx is not None:
        tensors[HEAD + "prompt_ctx"] = prompt_ctx.detach().float().cpu()
    adapter_info = None
    if adapter is not None:
        adapter_info = _adapter_info(adapter, adapter_config)
        a_tensors, a_info = lowbit_state(adapter, ADAPTER)
        tensors.update(a_tensors)
        info["quantized"].update(a_info["quantized"])
        info["zeros"].update(a_info["zeros"])
    info.update(
        model={
            "name": model_name,
            "pretrained": pretrained,
            "config": _model_config(model_name, model_config),
        },
        spec=spec.to_dict(),
        classnames=list(classnames) if classnames is not None else None,
        adapter=adapter_info,
        versions=versions(),
        extra=dict(extra or {}),
    )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ExportMismatchError(
            f"{bad[0]} holds NaN or infinite values ({len(bad)} such tensors); the run diverged, "
            "so there is nothing sound to export: lower the learning rate or use an earlier "
            "checkpoint"
        )
    nbytes = write_container(path, tensors, info)
    report = ExportReport(Path(path), nbytes, float32_nbytes(student))
    log.info("exported %s: %.2f MB, %.2fx smaller than float32", path, nbytes / 1e6, report.ratio)
    return report
