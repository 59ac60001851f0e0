"""Class sharding of the text pass: the slices cover every class once; without a process group
nothing is sharded. The gradient exactness under DDP is tested end to end in
tests/training/test_ddp_equals_one_process.py."""

import pytest
import torch

from p4q_lightning.model.text_sharding import gather_sharded, shard_bounds


@pytest.mark.parametrize("n_items", [1, 2, 7, 48, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_cover_every_class_once(n_items: int, world_size: int) -> None:
    covered = []
    for rank in range(world_size):
        lo, hi = shard_bounds(n_items, rank, world_size)
        assert 0 <= lo <= hi <= n_items
        covered.extend(range(lo, hi))
    assert covered == list(range(n_items))


def test_without_process_group_every_class_is_encoded_here() -> None:
    calls = []

    def encode(lo: int, hi: int) -> torch.Tensor:
        calls.append((lo, hi))
        return torch.arange(lo, hi, dtype=torch.float32)[:, None]

    features, shard = gather_sharded(5, encode)
    assert calls == [(0, 5)] and shard == (0, 5)
    assert features.squeeze(1).tolist() == [0, 1, 2, 3, 4]
