"""Cached image features of the few-shot training set, for a fixed number of augmented views.

The image towers are frozen and the adapter sits after them, so the student's (pre-adapter) and
the teacher's image features of an augmented image never change during training. Computing them
once for ``views`` augmentations of every image leaves a training step with the prompt text
tower and the adapter only. Sample ``i`` in epoch ``e`` uses view ``(e + offset_i) % views``:
every view of every image is used once per ``views`` epochs, so ``views >= max_epochs`` sees as
many distinct augmentations as live augmentation does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from p4q_lightning.distributed import all_agree, broadcast, world
from p4q_lightning.files import atomic_write
from p4q_lightning.seeding import seeded_global_rng

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FeatureCache:
    """Features [views, N, D] per encoder name (``student``, ``teacher``) and labels [N]."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    offsets: torch.Tensor
    encoded_here: tuple[int, ...] = ()  # views this process encoded (not saved)

    @property
    def views(self) -> int:
        return int(next(iter(self.features.values())).shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features, "labels": self.labels, "offsets": self.offsets}


class CachedFeatureDataset(Dataset):
    """A dataset over a :class:`FeatureCache`; set :attr:`epoch` before each epoch.

    It can exist before its cache (``length`` items, :meth:`fill` later): Lightning sizes the
    training loader while the optimisers are configured, before the student is calibrated, so
    the features can only be encoded afterwards. Items past the end of a shorter cache (images
    skipped as unreadable while encoding) are None, and :meth:`collate` drops them, as the
    image loader drops unreadable images.
    """

    def __init__(self, cache: FeatureCache | None = None, length: int | None = None) -> None:
        if cache is None and length is None:
            raise ValueError("give the cache or the number of items it will hold")
        self.cache = cache
        self.length = len(cache) if length is None else length
        self.epoch = 0

    def fill(self, cache: FeatureCache) -> None:
        """Hold ``cache`` from now on (encoded for the ``length`` images of the dataset)."""
        if len(cache) > self.length:
            raise ValueError(f"{len(cache)} cached items for a dataset of {self.length}")
        if len(cache) < self.length:
            log.warning(
                "%d of %d training images could not be read and have no cached features; "
                "their places in each epoch are left out of the batches",
                self.length - len(cache),
                self.length,
            )
        self.cache = cache

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        cache = self.cache
        if cache is None:
            raise RuntimeError(
                "the image features are not cached yet: the fit encodes them at the start of "
                "training (P4QModule.on_train_start), after calibration"
            )
        if index >= len(cache):
            return None
        view = int(self.epoch + cache.offsets[index]) % cache.views
        item = {name: feats[view, index] for name, feats in cache.features.items()}
        item["label"] = cache.labels[index]
        return item

    def collate(self, items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        """``default_collate`` of the items that have features (an empty batch if none)."""
        kept = [item for item in items if item is not None]
        if kept:
            return default_collate(kept)
        assert self.cache is not None
        empty = {name: feats[0, :0] for name, feats in self.cache.features.items()}
        empty["label"] = self.cache.labels[:0]
        return empty


@torch.no_grad()
def build_feature_cache(
    dataset: Dataset,
    encoders: Mapping[str, Encoder],
    views: int,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> FeatureCache:
    """Encode ``views`` augmented passes over ``dataset`` (items ``(image, label, ...)``).

    Each view's augmentation is seeded by ``seed + view`` (main process and loader workers), so
    a view is the same whoever encodes it: under DDP with W ranks and ``views >= W``, rank r
    encodes views r, r + W, ... and receives the others by broadcast, so the cache is built
    once in total, not once per rank.
    """
    if views < 1:
        raise ValueError(f"a feature cache needs views >= 1, got {views}")
    rank, world_size = world()
    shard = world_size > 1 and views >= world_size
    mine = [v for v in range(views) if not shard or v % world_size == rank]
    if shard:
        log.info("encoding views %s of %d here; the other ranks encode the rest", mine, views)
    per_view: dict[str, dict[int, torch.Tensor]] = {name: {} for name in encoders}
    labels: torch.Tensor | None = None
    for view in mine:
        generator = torch.Generator().manual_seed(seed + view)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=generator,
            collate_fn=collate_fn,
        )
        outs: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
        view_labels = []
        with seeded_global_rng(seed + view):
            for batch in tqdm(
                loader,
                desc=f"caching features (view {view + 1}/{views})",
                disable=not progress,
                leave=False,
            ):
                images, y = batch[0], batch[1]
                if images.shape[0] == 0:  # every image of the batch skipped as corrupt
                    continue
                images = images.to(device, non_blocking=True)
                for name, encode in encoders.items():
                    outs[name].append(encode(images).float().cpu())
                view_labels.append(torch.as_tensor(y).cpu())
        for name in encoders:
            per_view[name][view] = torch.cat(outs[name])
        labels = torch.cat(view_labels) if labels is None else labels
    assert labels is not None
    if shard:
        for view in range(views):  # every view from the rank that encoded it
            for done in per_view.values():
                mine_or_empty = done.get(view)
                if mine_or_empty is None:
                    mine_or_empty = torch.empty_like(next(iter(done.values())))
                done[view] = broadcast(mine_or_empty, src=view % world_size, device=device)
    offsets = torch.randint(0, views, (len(labels),), generator=torch.Generator().manual_seed(seed))
    features = {
        name: torch.stack([done[v] for v in range(views)]) for name, done in per_view.items()
    }
    return FeatureCache(
        features=features, labels=labels.long(), offsets=offsets, encoded_here=tuple(mine)
    )


def dataset_fingerprint(dataset: Dataset, extra: Mapping[str, Any] | None = None) -> str:
    """A best-effort identity of a dataset and its augmentation, for the on-disk cache key."""
    parts: dict[str, Any] = {"type": type(dataset).__qualname__, "len": len(dataset)}  # type: ignore[arg-type]
    for attr in ("samples", "targets", "indices"):
        value = getattr(dataset, attr, None)
        if value is not None:
            parts[attr] = hashlib.sha1(repr(list(value)).encode()).hexdigest()
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        parts["transform"] = repr(transform)
    parts.update(extra or {})
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    build: Callable[[], FeatureCache],
    device: torch.device | str = "cpu",
) -> FeatureCache:
    """Load ``features-<key>.pt`` from ``cache_dir`` or build it and write it atomically."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir).expanduser() / f"features-{key}.pt"
    loaded: FeatureCache | None = None
    if path.is_file():
        try:
            loaded = FeatureCache(**torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # a corrupt or foreign file is rebuilt, not fatal
            log.warning("ignoring unreadable feature cache %s (%s); rebuilding", path, err)
    # under DDP the build is collective: every rank loads, or every rank builds
    if all_agree(loaded is not None, device):
        log.info("loaded cached image features from %s", path)
        return loaded  # type: ignore[return-value]
    cache = build()
    if world()[0] == 0:  # every rank holds the same cache: one writer
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(cache.to_dict(), tmp)
        log.info("wrote image features to %s", path)
    return cache
