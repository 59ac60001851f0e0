"""The cached-feature dataset: sized before its cache exists, filled later, and dropping the
places of images that could not be encoded."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from p4q_lightning.training.feature_cache import CachedFeatureDataset, FeatureCache


def cache(n: int, views: int = 2, dim: int = 3) -> FeatureCache:
    features = torch.arange(views * n * dim, dtype=torch.float32).reshape(views, n, dim)
    return FeatureCache({"student": features}, torch.arange(n), torch.zeros(n, dtype=torch.long))


def test_sized_before_the_cache_and_filled_later():
    ds = CachedFeatureDataset(length=4)
    assert len(ds) == 4
    with pytest.raises(RuntimeError, match="not cached yet"):
        ds[0]
    full = cache(4)
    ds.fill(full)
    ds.epoch = 1
    assert torch.equal(ds[2]["student"], full.features["student"][1, 2])
    assert int(ds[2]["label"]) == 2
    assert len(CachedFeatureDataset(full)) == 4


def test_collate_is_default_collate_and_drops_images_that_were_not_encoded(caplog):
    ds = CachedFeatureDataset(length=5)
    ds.fill(cache(3))  # two unreadable images
    assert "2 of 5 training images could not be read" in caplog.text
    assert ds[3] is None and ds[4] is None
    batches = list(DataLoader(ds, batch_size=2, collate_fn=ds.collate))
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2], []]
    assert batches[2]["student"].shape == (0, 3)
    reference = torch.utils.data.default_collate([ds[0], ds[1]])
    assert all(torch.equal(batches[0][k], reference[k]) for k in reference)


def test_a_cache_larger_than_the_dataset_is_refused():
    with pytest.raises(ValueError, match="5 cached items for a dataset of 4"):
        CachedFeatureDataset(length=4).fill(cache(5))
    with pytest.raises(ValueError):
        CachedFeatureDataset()
