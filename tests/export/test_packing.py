import pytest
import torch

from p4q_lightning.export import pack_codes, packed_nbytes, storage_bits, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 5, 2), (1,), (0, 3)])
def test_pack_unpack_round_trip_is_exact(bits: int, shape: tuple[int, ...]) -> None:
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, shape, dtype=torch.int8)
    if codes.numel():
        codes.view(-1)[0] = -qmax - 1  # the official grid's extra negative code
        codes.view(-1)[-1] = qmax
    stored = pack_codes(codes, bits)
    assert stored.numel() == packed_nbytes(codes.numel(), bits)
    assert stored.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert torch.equal(unpack_codes(stored, bits, shape), codes)


def test_int4_packs_two_codes_per_byte() -> None:
    codes = torch.tensor([-7, 7, 0, 1], dtype=torch.int8)
    stored = pack_codes(codes, 4)
    assert stored.tolist() == [(1) | (15 << 4), 8 | (9 << 4)]
    assert pack_codes(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0 | (15 << 4)]


def test_codes_outside_range_are_rejected() -> None:
    with pytest.raises(ValueError, match="4-bit range"):
        pack_codes(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="4-bit range"):
        pack_codes(torch.tensor([-9], dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="int8"):
        pack_codes(torch.tensor([1], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="supported widths"):
        storage_bits(9)


def test_unpack_checks_size() -> None:
    with pytest.raises(ValueError, match="packed uint8"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (8,))
