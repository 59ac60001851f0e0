"""Atomic writes, corruption detection and clear errors."""

import os
from pathlib import Path

import pytest
import torch

from p4q_lightning.export import (
    ExportMismatchError,
    ExportWriteError,
    LowBitFormatError,
    export_lowbit,
    load_lowbit,
    read_container,
    write_container,
)
from p4q_lightning.export import format as fmt
from p4q_lightning.export.writer import STUDENT


@pytest.fixture(scope="module")
def w8(tiny_float):
    from export_helpers import make_student

    return make_student(tiny_float, "w8a8")[0]


@pytest.fixture()
def exported(w8, tmp_path, tiny_name) -> Path:
    return export_lowbit(tmp_path / "m.safetensors", w8, model_name=tiny_name).path


def test_failure_mid_write_leaves_no_partial_file(w8, tmp_path, tiny_name, monkeypatch) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous export")

    def fail_halfway(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt, "_write_all", fail_halfway)
    with pytest.raises(ExportWriteError, match="nothing was written"):
        export_lowbit(target, w8, model_name=tiny_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() == b"previous export"


def test_interrupt_mid_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    def interrupted(f, data):
        f.write(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_container(tmp_path / "x.safetensors", {"a": torch.zeros(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportWriteError, match="cannot create the export directory"):
        write_container(blocker / "sub" / "m.safetensors", {"a": torch.zeros(1)}, {})
    with pytest.raises(ExportWriteError, match="is a directory"):
        write_container(tmp_path, {"a": torch.zeros(1)}, {})
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ExportWriteError, match="not writable"):
                write_container(ro / "m.safetensors", {"a": torch.zeros(1)}, {})
        finally:
            ro.chmod(0o700)


def test_truncated_file_is_detected(exported: Path) -> None:
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) - 1000])
    with pytest.raises(LowBitFormatError, match="corrupted or truncated|truncated"):
        load_lowbit(exported)
    exported.write_bytes(data[:5])
    with pytest.raises(LowBitFormatError, match="truncated"):
        load_lowbit(exported)


def test_altered_tensor_bytes_fail_the_checksum(exported: Path) -> None:
    data = bytearray(exported.read_bytes())
    data[-100] ^= 0x01
    exported.write_bytes(bytes(data))
    with pytest.raises(LowBitFormatError, match="checksum"):
        load_lowbit(exported)


def test_altered_metadata_fails_the_checksum(exported: Path) -> None:
    data = exported.read_bytes()
    # same length: keep the header size valid, change a bit width in the JSON
    altered = data.replace(b'\\"w_bits\\": 8', b'\\"w_bits\\": 6', 1)
    assert altered != data
    exported.write_bytes(altered)
    with pytest.raises(LowBitFormatError, match="checksum"):
        read_container(exported)


def test_not_an_export(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(LowBitFormatError, match="not a p4q low-bit export"):
        load_lowbit(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lowbit(tmp_path / "missing.safetensors")


def test_spec_model_mismatch_is_reported(w8, exported: Path, tiny_name) -> None:
    tensors, info = read_container(exported)
    info["spec"]["groups"]["text.token_embedding"]["w_bits"] = (
        None  # spec no longer fits the weights
    )
    write_container(
        exported, tensors, {k: v for k, v in info.items() if k not in ("format", "format_version")}
    )
    with pytest.raises(ExportMismatchError, match="does not fit"):
        load_lowbit(exported)


def test_wrong_architecture_is_reported(exported: Path) -> None:
    tensors, info = read_container(exported)
    tensors[STUDENT + "visual.proj"] = torch.zeros(3, 3)
    write_container(
        exported, tensors, {k: v for k, v in info.items() if k not in ("format", "format_version")}
    )
    with pytest.raises(ExportMismatchError, match="shape mismatch"):
        load_lowbit(exported)


def test_uncalibrated_student_is_refused(tiny_float, tmp_path, tiny_name) -> None:
    from p4q_lightning import quantize

    with pytest.raises(ExportMismatchError, match="calibrate"):
        export_lowbit(
            tmp_path / "m.safetensors", quantize(tiny_float[0], "w8a8"), model_name=tiny_name
        )
    assert list(tmp_path.iterdir()) == []


def test_text_features_need_matching_classnames(w8, tmp_path, tiny_name) -> None:
    with pytest.raises(ExportMismatchError, match="class names"):
        export_lowbit(
            tmp_path / "m.safetensors",
            w8,
            model_name=tiny_name,
            classnames=["a"],
            text_features=torch.zeros(3, 32),
        )


def test_newer_format_is_refused(exported: Path) -> None:
    tensors, info = read_container(exported)
    assert info["format_version"] == fmt.FORMAT_VERSION
    info["format_version"] = fmt.FORMAT_VERSION + 1
    write_container(exported, tensors, {k: v for k, v in info.items() if k != "format"})
    with pytest.raises(LowBitFormatError, match="newer than this p4q_lightning reads"):
        load_lowbit(exported)
