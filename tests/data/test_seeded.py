"""Seeded training loaders: the order and the crops of an epoch depend only on (seed, epoch,
index), not on the global RNG, the worker or the number of ranks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from p4q_lightning.data.seeded import (
    EpochIndexSampler,
    ResumableLoader,
    SeededItems,
    seeded_train_loader,
)


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


def test_a_resumed_loader_goes_on_with_the_batches_it_had_not_handed_out():
    def loader() -> ResumableLoader:
        return seeded_train_loader(RandomItems(), 3, trainer=None, default_seed=0)

    whole = loader()
    whole.sampler.set_epoch(2)
    reference = [labels.tolist() for _, labels in whole]  # 4 batches: 3 + 3 + 3 + 1
    first = loader()
    first.sampler.set_epoch(2)
    batches = iter(first)
    seen = [next(batches)[1].tolist(), next(batches)[1].tolist()]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2} and seen == reference[:2]
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch after restoring, before iterating
    assert [labels.tolist() for _, labels in resumed] == reference[2:]
    assert len(resumed) == 4  # the whole epoch: Lightning counts the resumed batches itself
    assert [labels.tolist() for _, labels in resumed] == reference  # the next pass is whole
    other = loader()
    other.load_state_dict(state)
    other.sampler.set_epoch(3)  # a checkpoint from the end of epoch 2: nothing to skip
    assert len([x for x in other]) == 4
