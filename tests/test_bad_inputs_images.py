"""High-bit-depth images (16-bit PNG, 16-bit PGM, float TIFF) reach the model as correctly
scaled 8-bit RGB from every decoding path (image folder, hub dataset, in-memory cache, exported
model), or are refused in one line that names the file; 8-bit conversion must never clip a
16-bit image to white."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from PIL import Image

from p4q_lightning.data.datasets import decode_all
from p4q_lightning.data.hub import HubSource
from p4q_lightning.data.sources import CorruptImageError, FolderSource, decode_image

# a 16-bit grey ramp over the whole range: 0, 257, ..., 65535 (exactly k * 257)
RAMP16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
EXPECTED8 = np.arange(256, dtype=np.uint8).reshape(16, 16)


def png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): colour type 0 = grey,
    2 = RGB."""
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def encoded(kind: str) -> bytes:
    """The ramp in one high-bit-depth encoding."""
    if kind == "png-I;16":
        buf = io.BytesIO()
        Image.fromarray(RAMP16).save(buf, format="PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
        return buf.getvalue()
    if kind == "pgm-I":  # PIL opens 16-bit PGM as mode "I"
        data = b"P5\n16 16\n65535\n" + RAMP16.astype(">u2").tobytes()
        assert Image.open(io.BytesIO(data)).mode == "I"
        return data
    if kind == "tiff-F":  # float in [0, 1]
        buf = io.BytesIO()
        Image.fromarray((EXPECTED8 / 255.0).astype(np.float32)).save(buf, format="TIFF")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "F"
        return buf.getvalue()
    if kind == "png-rgb16":
        return png16(np.repeat(RAMP16[..., None], 3, axis=-1), color_type=2)
    raise AssertionError(kind)


KINDS = ["png-I;16", "pgm-I", "tiff-F", "png-rgb16"]
SUFFIX = {"png-I;16": ".png", "pgm-I": ".ppm", "tiff-F": ".tif", "png-rgb16": ".png"}


def assert_ramp(img: Image.Image) -> None:
    assert img.mode == "RGB"
    pixels = np.asarray(img)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], EXPECTED8)


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_scales_high_bit_depth_to_8_bits(kind):
    assert_ramp(decode_image(encoded(kind), kind))


def write_folder(root: Path, kind: str) -> Path:
    for cls in ("dark", "light"):
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}{SUFFIX[kind]}").write_bytes(encoded(kind))
    return root


@pytest.mark.parametrize("kind", ["png-I;16", "pgm-I"])
def test_folder_and_in_memory_cache_scale_16_bit_images(tmp_path, kind):
    source = FolderSource(write_folder(tmp_path / "folder", kind))
    assert_ramp(source.load("train", 0))
    images, labels, skipped = decode_all(source, "train", [0, 3], False, shorter_side=None)
    assert not skipped and labels == [0, 1]
    for img in images:
        assert_ramp(img)


def test_hub_dataset_scales_16_bit_images(tmp_path):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    cells = [{"bytes": encoded("png-I;16"), "path": None}] * 4
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    source = HubSource(str(tmp_path / "saved"))
    assert_ramp(source.load("train", 1))


def test_exported_model_scales_16_bit_files(tmp_path):
    from p4q_lightning.export.loader import LowBitCLIP

    path = tmp_path / "grey16.png"
    path.write_bytes(encoded("png-I;16"))
    as_is = SimpleNamespace(preprocess=lambda img: img)  # what reaches the model's transform
    assert_ramp(LowBitCLIP._one_image(as_is, path))
    with Image.open(path) as opened:
        opened.load()
        assert_ramp(LowBitCLIP._one_image(as_is, opened))


@pytest.mark.parametrize(
    ("values", "mode", "fmt"),
    [
        (np.full((4, 4), 2.5, dtype=np.float32), "F", "TIFF"),  # float outside [0, 1]
        (np.full((4, 4), 70000, dtype=np.int32), "I", "TIFF"),  # beyond 16 bits
        (np.full((4, 4), -3, dtype=np.int32), "I", "TIFF"),
    ],
)
def test_pixels_without_an_8_bit_reading_are_refused_in_one_line(tmp_path, values, mode, fmt):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path, format=fmt)
    assert Image.open(path).mode == mode
    with pytest.raises(CorruptImageError) as info:
        decode_image(path, str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "convert the file to 8-bit" in message
