"""Training loaders whose order and augmentation are functions of (seed, epoch, index).

With live augmentation, a shuffled loader normally draws its order and every random crop from
the global generators, whose state depends on what ran before, on the worker and on the rank.
A resumed fit or a run on more GPUs then sees other crops than the uninterrupted one. Here the
sampler shuffles by (seed, epoch) and hands each index together with its epoch to the workers
(so persistent workers need no shared state), and each item is transformed under a torch
generator seeded from (seed, epoch, index): the crops of an epoch are the same however the
fit was launched or interrupted.

:class:`ResumableLoader` makes a fit resumed from a mid-epoch checkpoint (``every_n_train_steps``,
a SLURM requeue, a SIGTERM) go on with the batches it had not yet seen: the loader's state
(epoch, batches handed out) goes into the checkpoint through the datamodule
(:class:`~p4q_lightning.data.feature_serving.FeatureServing`) and its sampler skips the batches
already trained on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from p4q_lightning import seeding


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed and epoch, split by rank) that can start its
    next pass a number of items in (:meth:`skip_next`), to resume an epoch. Lightning calls
    ``set_epoch`` before every epoch and leaves a ``DistributedSampler`` in place under DDP."""

    skip = 0

    def skip_next(self, items: int) -> None:
        """Leave out the first ``items`` indices of this rank's next pass (once)."""
        self.skip = int(items)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class EpochIndexSampler(ResumableSampler):
    """:class:`ResumableSampler` yielding ``(epoch, index)`` pairs."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededItems(Dataset):
    """``dataset[index]`` computed under a torch generator seeded by (seed, epoch, index).

    Keys are ``(epoch, index)`` pairs from :class:`EpochIndexSampler`; a plain integer index
    reads the item unseeded (as the feature cache does, with its own seeding). Other attributes
    are the wrapped dataset's (``samples``, ``transform``...).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        with seeding.seeded_global_rng(item_seed(self.seed, epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item of one epoch."""
    return seeding.seed_from_text(f"{seed}:{epoch}:{index}")


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableSampler` that Lightning resumes
    mid-epoch: its ``state_dict`` (saved in every checkpoint) is the epoch of the current pass
    and the batches it has handed out; after ``load_state_dict``, the first pass of that same
    epoch skips those batches (a pass of another epoch, i.e. a checkpoint from the end of an
    epoch, skips nothing). The pass starts at its first batch, after Lightning set the epoch, so
    it also leaves eager loader workers the right epoch. ``len`` stays the whole epoch, as
    Lightning counts the resumed epoch's batches from the checkpoint's progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise TypeError("ResumableLoader needs a ResumableSampler and a batch_size")
        self._pass: tuple[int, int] = (-1, 0)  # (epoch, batches handed out)
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch = int(self.sampler.epoch)
        done = 0
        if self._resume is not None:
            resume_epoch, resume_done = self._resume
            self._resume = None
            done = resume_done if resume_epoch == epoch else 0
        self.sampler.skip_next(done * self.batch_size)
        self._pass = (epoch, done)
        for batch in super().__iter__():
            done += 1
            self._pass = (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._pass
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


def run_sampler(
    dataset: Dataset,
    trainer: Any,
    default_seed: int = 0,
    drop_last: bool = False,
    sampler_class: type[ResumableSampler] = ResumableSampler,
) -> ResumableSampler:
    """The training order of one run: shuffled by the run seed (``seed_everything``'s, else
    ``default_seed``) and the epoch, split by rank (``trainer`` gives world size and rank; None
    means one process). With N ranks of batch B, a global batch is the same set of samples as
    one process's batch of N x B. Lightning calls ``set_epoch`` before every epoch and leaves a
    ``DistributedSampler`` in place under DDP."""
    world, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
    return sampler_class(
        dataset,
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=seeding.derived_seed("shuffle", default_seed),
        drop_last=drop_last,
    )


def seeded_train_loader(
    dataset: Dataset, batch_size: int, trainer: Any, default_seed: int = 0, **kwargs: Any
) -> DataLoader:
    """A shuffled training loader over ``dataset`` whose order and augmentation follow the run
    seed (``seed_everything``'s, else ``default_seed``), the epoch and, under DDP, the rank
    (``trainer`` gives world size and rank; None means one process)."""
    sampler = run_sampler(dataset, trainer, default_seed, sampler_class=EpochIndexSampler)
    items = SeededItems(dataset, seeding.derived_seed("augment", default_seed))
    return ResumableLoader(items, batch_size=batch_size, sampler=sampler, **kwargs)
