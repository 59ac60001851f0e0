"""Size of the low-bit export vs the float32 open_clip state dict, per preset.

    python benchmarks/export_size.py [--model ViT-B-32] [--presets w8a8 w4a4 p4q-448]

Weights are random (pretrained=None): the file size does not depend on their values. Prints a
markdown table. Calibration uses two random images and two prompts with min-max observers
(only to freeze the weights; the ranges are irrelevant to the size).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from p4q_lightning import calibrate, get_spec, load_clip, quantize
from p4q_lightning.export import export_lowbit
from p4q_lightning.quant import ALL_GROUPS


def float_state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of the float32 open_clip state dict written with torch.save."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def measure(
    model_name: str,
    preset: str,
    directory: Path,
    float_model: torch.nn.Module | None = None,
    tokenizer=None,
) -> dict[str, float]:
    """Export ``model_name`` quantized with ``preset``; return file size and ratios."""
    if float_model is None:
        float_model, _, tokenizer = load_clip(model_name, None)
    spec = get_spec(preset, {g: {"a_observer": "minmax"} for g in ALL_GROUPS})
    student = quantize(float_model, spec)
    size = float_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    calibrate(
        student,
        torch.randn(2, 3, size, size),
        tokenizer(["a photo of a cat.", "a dog."]),
        progress=False,
    )
    report = export_lowbit(
        directory / f"{model_name}-{preset}.safetensors", student, model_name=model_name
    )
    fp_tensors = float_model.state_dict()
    fp_bytes = len(st_save({k: v.contiguous() for k, v in fp_tensors.items()}))
    return {
        "file_bytes": report.file_bytes,
        "float32_params_bytes": report.float32_bytes,
        "float32_safetensors_bytes": fp_bytes,
        "ratio": fp_bytes / report.file_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--presets", nargs="+", default=["w8a8", "w4a8", "w4a4", "p4q-448"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, _, tokenizer = load_clip(args.model, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            t = time.perf_counter()
            r = measure(args.model, preset, Path(tmp), model, tokenizer)
            rows.append((preset, r, time.perf_counter() - t))
    out = sys.stdout
    out.write(f"\n{args.model}: low-bit export vs float32 state dict (safetensors)\n\n")
    out.write("| preset | export MB | float32 MB | ratio |\n|---|---:|---:|---:|\n")
    for preset, r, _ in rows:
        out.write(
            f"| {preset} | {r['file_bytes'] / 1e6:.2f} | "
            f"{r['float32_safetensors_bytes'] / 1e6:.2f} | "
            f"{r['ratio']:.3f}x |\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
