"""The feature cache: the features equal the live ones, the dataset is sized before its cache
exists and filled later (dropping the places of images that could not be encoded), and a cache
on disk is reused by the next fit."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

import tiny_world
from p4q_lightning.module import P4QModule
from p4q_lightning.training.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    build_feature_cache,
)


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
    with caplog.at_level(logging.WARNING, logger="p4q_lightning"):  # whatever the root's level
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


def test_cached_features_equal_live_features(world):
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    dm.train_dataset.transform = dm.eval_tf  # deterministic views
    module = P4QModule(**tiny_world.module_args(world))
    module.set_classes(dm.classnames, dm.templates)
    module.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    encoders = {
        "student": module.classifier.student_image_features,
        "teacher": module.classifier.teacher_image_features,
    }
    cache = build_feature_cache(dm.train_dataset, encoders, views=3, batch_size=5, progress=False)
    assert cache.features["student"].shape == (3, 32, 32)
    images, labels = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=32)))
    torch.testing.assert_close(
        cache.features["student"][1], module.classifier.student_image_features(images)
    )
    torch.testing.assert_close(
        cache.features["teacher"][2], module.classifier.teacher_image_features(images)
    )
    assert torch.equal(cache.labels, labels)
    ds = CachedFeatureDataset(cache)
    seen = set()
    for epoch in range(3):
        ds.epoch = epoch
        seen.add(int((epoch + cache.offsets[0]) % 3))
        assert set(ds[0]) == {"student", "teacher", "label"}
    assert seen == {0, 1, 2}  # every view once per `views` epochs


def test_feature_cache_on_disk_is_reused(world, tmp_path, caplog):
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    cache_dir = tmp_path / "features"
    for _ in range(2):
        module = P4QModule(**tiny_world.module_args(world, features={"cache_dir": str(cache_dir)}))
        with caplog.at_level(logging.INFO, logger="p4q_lightning"):
            tiny_world.trainer(tmp_path).fit(module, dm)
    files = list(cache_dir.glob("features-*.pt"))
    assert len(files) == 1
    assert any("loaded cached image features" in r.getMessage() for r in caplog.records)
