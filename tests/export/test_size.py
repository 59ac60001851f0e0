"""File size of the export vs the float32 state dict."""

import pytest
import torch
from safetensors.torch import save as st_save

from p4q_lightning import calibrate, get_spec, load_clip, quantize
from p4q_lightning.export import estimate_lowbit_nbytes, export_lowbit, float32_nbytes
from p4q_lightning.quant import ALL_GROUPS


def test_tiny_file_size_matches_estimate(student, tmp_path, tiny_name) -> None:
    preset, model, _ = student
    report = export_lowbit(tmp_path / "m.safetensors", model, model_name=tiny_name)
    data = estimate_lowbit_nbytes(model)
    assert data < report.file_bytes < data + 200_000  # the rest is the JSON header
    assert report.float32_bytes == float32_nbytes(model)
    # the tiny model is mostly its 49408 x 64 token table: quantized in w8a8/w4a4, float in p4q-*
    minimum = {"w8a8": 3.6, "w4a4": 6.7, "p4q-448": 1.0, "p4q-official": 1.0}[preset]
    assert report.ratio >= minimum


@pytest.mark.slow
def test_vit_b32_size_ratios(tmp_path) -> None:
    """ViT-B-32, random weights (size does not depend on values): >= 3.9x at 8 bits, 7.5x at 4."""
    model, _, tokenizer = load_clip("ViT-B-32", None)
    fp_bytes = len(st_save({k: v.contiguous() for k, v in model.state_dict().items()}))
    for preset, minimum in (("w8a8", 3.9), ("w4a4", 7.5)):
        student = quantize(
            model, get_spec(preset, {g: {"a_observer": "minmax"} for g in ALL_GROUPS})
        )
        calibrate(student, torch.randn(1, 3, 224, 224), tokenizer(["a cat."]), progress=False)
        report = export_lowbit(tmp_path / f"{preset}.safetensors", student, model_name="ViT-B-32")
        del student
        assert fp_bytes / report.file_bytes >= minimum, (preset, fp_bytes / report.file_bytes)
        assert report.ratio >= minimum
        report.path.unlink()
