"""Seeded training loaders: the order and the crops of an epoch depend only on (seed, epoch,
index), not on the global RNG, the worker or the number of ranks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from p4q_lightning.data.seeded import EpochIndexSampler, SeededItems, seeded_train_loader


class RandomItems(Dataset):
    """Item i is (a draw from the global torch RNG, i): what a random crop does."""

    samples = ["a", "b"]

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), index


def test_an_item_of_an_epoch_is_the_same_whatever_the_global_rng():
    items = SeededItems(RandomItems(), seed=7)
    torch.manual_seed(0)
    first = items[(2, 5)][0]
    torch.manual_seed(1)
    assert torch.equal(items[(2, 5)][0], first)
    assert not torch.equal(items[(3, 5)][0], first)  # another epoch, another crop
    assert not torch.equal(SeededItems(RandomItems(), seed=8)[(2, 5)][0], first)
    state = torch.get_rng_state()
    items[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert items[4][1] == 4 and items.samples == ["a", "b"]  # plain index, attributes


def test_the_sampler_shuffles_by_epoch_and_two_ranks_split_one_epoch():
    one = EpochIndexSampler(RandomItems(), num_replicas=1, rank=0, seed=3)
    one.set_epoch(4)
    pairs = list(one)
    assert {e for e, _ in pairs} == {4} and sorted(i for _, i in pairs) == list(range(10))
    assert pairs == list(one)  # the same order when asked again (a resumed epoch)
    one.set_epoch(5)
    assert [i for _, i in one] != [i for _, i in pairs]
    ranks = [EpochIndexSampler(RandomItems(), num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    assert sorted(i for s in ranks for _, i in s) == list(range(10))


def test_the_loader_gives_the_same_epoch_in_a_fresh_process_state():
    def epoch(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        loader = seeded_train_loader(RandomItems(), 4, trainer=None, default_seed=0)
        loader.sampler.set_epoch(1)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(0), epoch(99))
