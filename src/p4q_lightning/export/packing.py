"""Integer packing of quantized weight codes: int8 as is, 4-bit codes two per byte.

Codes come from symmetric quantizers (:meth:`WeightQuantizer.codes`), so a ``b``-bit code lies
in ``[-2^(b-1), 2^(b-1)-1]`` (the restricted grid leaves out ``-2^(b-1)``, the official grid
uses it). Codes of 2..4 bits fit a nibble after a +8 offset; 5..8 bit codes are stored as int8.
Packing is exact: ``unpack(pack(c)) == c``.
"""

from __future__ import annotations

import math

import torch

NIBBLE_OFFSET = 8


def storage_bits(bits: int) -> int:
    """Bits one code occupies in the file: 4 for 2..4-bit codes, 8 for 5..8-bit codes."""
    if not 2 <= bits <= 8:
        raise ValueError(f"cannot store {bits}-bit codes: supported widths are 2..8 bits")
    return 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes of a ``bits``-bit symmetric grid into the smallest storage tensor.

    Returns an int8 tensor of the same shape (5..8 bits) or a flat uint8 tensor of
    ``ceil(numel / 2)`` bytes (2..4 bits; element ``2i`` in the low nibble, ``2i+1`` high).
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    qmax = 2 ** (bits - 1) - 1
    if codes.numel() and (int(codes.min()) < -qmax - 1 or int(codes.max()) > qmax):
        raise ValueError(
            f"codes outside the {bits}-bit range [{-qmax - 1}, {qmax}] "
            f"(min {int(codes.min())}, max {int(codes.max())}): wrong bit width for this weight"
        )
    if storage_bits(bits) == 8:
        return codes.contiguous()
    flat = codes.reshape(-1).to(torch.int16) + NIBBLE_OFFSET
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), NIBBLE_OFFSET)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_codes(
    stored: torch.Tensor, bits: int, shape: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of the given shape."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if storage_bits(bits) == 8:
        if stored.dtype != torch.int8 or tuple(stored.shape) != shape:
            raise ValueError(
                f"stored {bits}-bit codes should be int8 of shape {shape}, got {stored.dtype} "
                f"{tuple(stored.shape)}"
            )
        return stored
    if stored.dtype != torch.uint8 or stored.numel() != (numel + 1) // 2:
        raise ValueError(
            f"stored {bits}-bit codes should be {(numel + 1) // 2} packed uint8 bytes for shape "
            f"{shape}, got {stored.dtype} with {stored.numel()} elements"
        )
    b = stored.reshape(-1).to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]
    return (nibbles - NIBBLE_OFFSET).to(torch.int8).reshape(shape)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_codes` produces for ``numel`` codes."""
    return numel if storage_bits(bits) == 8 else (numel + 1) // 2
