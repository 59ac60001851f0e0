"""The on-disk container: safetensors tensors + JSON metadata, written atomically, checksummed.

safetensors' metadata is a ``str -> str`` dict, so everything that is not a tensor (model name,
quant spec, class names, versions, which tensors hold integer codes) is one JSON string under
``"p4q"``. The checksum (sha256 over every tensor's name, dtype, shape and bytes, plus that
JSON) makes a truncated or damaged file fail loudly at load instead of predicting garbage.

What the checksum does *not* do: authenticate. Anyone who edits a file can recompute it, so it
protects against accidents (truncation, bit rot, a half-copied file), not against tampering.
Safety against a crafted file comes from the loader instead: it never imports or calls anything
the file names, and :mod:`p4q_lightning.export.schema` validates every field before use.
Format 2 names the adapter by a registered kind; format 1 named it by import path. Format 3
stores attention's packed q/k/v projection as its ``in_proj`` leaf (``attn.in_proj.weight``,
``attn.in_proj.weight_quantizer.scale``...) where formats 1-2 had ``attn.in_proj_weight`` and
``attn.weight_quantizer.scale``; the loader renames the old names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = "p4q-lowbit"
FORMAT_VERSION = 3
#: the first version with attention's q/k/v projection stored as the ``in_proj`` leaf
ATTENTION_LEAF_VERSION = 3
_CHUNK = 16 << 20


class LowBitFormatError(ValueError):
    """The file is not an intact p4q low-bit export (truncated, altered or another format)."""


class ExportMismatchError(ValueError):
    """An export does not fit the model it is loaded into (spec, architecture or shapes)."""


class ExportWriteError(OSError):
    """The export could not be written; no partial file is left behind."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def checksum(tensors: Mapping[str, torch.Tensor], info_json: str) -> str:
    """sha256 of the metadata JSON and every tensor (name, dtype, shape, bytes), name-sorted."""
    h = hashlib.sha256(info_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start : start + _CHUNK])


def check_writable(path: Path) -> None:
    """Fail early (before slow work) when ``path`` cannot be written as an export file."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportWriteError(
            f"cannot create the export directory {parent}: {e.strerror or e}; "
            "choose a writable path"
        ) from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportWriteError(f"export directory {parent} is not writable; choose another path")
    if path.is_dir():
        raise ExportWriteError(
            f"export path {path} is a directory; give a file name such as model.safetensors"
        )


def write_container(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], info: dict[str, Any]
) -> int:
    """Write ``tensors`` and ``info`` to ``path`` atomically; return the file size in bytes.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows), so readers see the old file or
    the complete new one, never a partial one; on any failure the temporary file is removed.
    """
    path = Path(path).expanduser()
    check_writable(path)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, **info}
    info_json = json.dumps(info, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "p4q": info_json, "checksum": checksum(tensors, info_json)}
    data = st_save(tensors, metadata=metadata)
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if isinstance(e, ExportWriteError):
            raise
        raise ExportWriteError(
            f"writing {path} failed: {e.strerror or e}; nothing was written, choose a writable path"
        ) from e
    log.info("wrote %s (%.2f MB, %d tensors)", path, len(data) / 1e6, len(tensors))
    return len(data)


def read_container(
    path: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export written by :func:`write_container`; check format and checksum."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"low-bit export {path} does not exist")
    data = path.read_bytes()
    try:
        header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        if header_len < 0 or 8 + header_len > len(data):
            raise LowBitFormatError(
                f"{path} is truncated or not a safetensors file ({len(data)} bytes, header says "
                f"{header_len}); re-export it"
            )
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = st_load(data)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowBitFormatError(f"{path} is corrupted or truncated ({e}); re-export it") from e
    if metadata.get("format") != FORMAT or "p4q" not in metadata:
        raise LowBitFormatError(
            f"{path} is a safetensors file but not a p4q low-bit export (metadata format="
            f"{metadata.get('format')!r}); write one with p4q_lightning.export.export_lowbit"
        )
    info_json = metadata["p4q"]
    if verify:
        expected = metadata.get("checksum", "")
        actual = checksum(tensors, info_json)
        if actual != expected:
            raise LowBitFormatError(
                f"{path} failed its checksum (stored {expected[:19]}..., "
                f"computed {actual[:19]}...): "
                "the file was damaged after export (the checksum detects accidents, it is not a "
                "signature); re-export it"
            )
    info = json.loads(info_json)
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise LowBitFormatError(
            f"{path} uses export format version {info['format_version']}, newer than this "
            f"p4q_lightning reads ({FORMAT_VERSION}); upgrade p4q_lightning"
        )
    return tensors, info
