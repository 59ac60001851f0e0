"""Read the records of an offline W&B run file (``run-<id>.wandb``) without a W&B server.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
4 last) carrying a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, _magic, _version = HEADER.unpack_from(data)
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        pos += CHUNK.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_files(save_dir: Path) -> list[Path]:
    """Every offline run file under a logger's ``save_dir`` (one per ``wandb.init``)."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
