"""CoOp few-shot protocol: per-class counts, seeded determinism, split-file reuse."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from data_helpers import label_counts, write_class_folders

from p4q_lightning.data.fewshot import sample_per_class

CLASSES = ["golden_retriever", "tabby_cat", "red_fox", "zebra"]


def test_sample_per_class_takes_k_each_and_all_of_short_classes():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    chosen, short = sample_per_class(labels, 4, random.Random(1), num_classes=3)
    picked = [labels[i] for i in chosen]
    assert picked.count(0) == 4 and picked.count(2) == 4
    assert picked.count(1) == 3 and short == {1: 3}
    assert len(set(chosen)) == len(chosen)


def test_sample_per_class_respects_exclusions():
    labels = [0] * 6
    chosen, _ = sample_per_class(labels, 3, random.Random(0), 1, exclude={0, 1, 2})
    assert sorted(chosen) == [3, 4, 5]


@pytest.fixture
def folder(tmp_path):
    return write_class_folders(tmp_path / "pets", CLASSES, 12)


@pytest.mark.parametrize("shots", [1, 2, 4, 8])
def test_k_shots_per_class_and_val_min_k_4(dm_factory, folder, shots):
    dm = dm_factory(str(folder), shots=shots, seed=1)
    dm.setup("fit")
    assert label_counts(dm.train_dataset) == {c: shots for c in range(4)}
    assert label_counts(dm.val_dataset) == {c: min(shots, 4) for c in range(4)}
    assert not set(dm.split["train"]) & set(dm.split["val"])  # val excludes the train shots
    assert dm.classnames == ["golden retriever", "red fox", "tabby cat", "zebra"]
    assert dm.num_classes == 4 and dm.templates == ["a photo of a {}."]


def test_same_seed_same_split_different_seed_differs(tmp_path, dm_factory, folder):
    a = dm_factory(str(folder), shots=4, seed=1)
    b = dm_factory(str(folder), shots=4, seed=1, split_dir=str(tmp_path / "other"))
    c = dm_factory(str(folder), shots=4, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.split["train"] == b.split["train"] and a.split["val"] == b.split["val"]
    assert a.split["train"] != c.split["train"]
    # identical pixels too, not only ids
    xa = torch.stack([a.train_dataset.transform.transforms[0](im) for im in a.train_dataset.images])
    xb = torch.stack([b.train_dataset.transform.transforms[0](im) for im in b.train_dataset.images])
    assert torch.equal(xa, xb)


def test_split_file_is_written_and_reused(dm_factory, folder):
    dm = dm_factory(str(folder), shots=2, seed=3)
    dm.prepare_data()
    path = dm.split_file
    stored = json.loads(path.read_text())
    assert stored["shots"] == 2 and stored["seed"] == 3 and len(stored["train"]) == 8
    # Hand-edit the file: a fresh datamodule must use it rather than resample.
    forced = sorted(k for k in stored_keys(folder) if k.endswith(("img_000.png", "img_001.png")))
    stored["train"] = forced
    path.write_text(json.dumps(stored))
    again = dm_factory(str(folder), shots=2, seed=3)
    again.setup("fit")
    assert again.split["train"] == forced
    assert len(again.train_dataset) == 8


def stored_keys(folder):
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.png"))]


def test_split_file_of_a_changed_dataset_is_rejected(dm_factory, folder):
    dm = dm_factory(str(folder), shots=2, seed=1)
    dm.prepare_data()
    (folder / "zebra" / "img_011.png").unlink()
    stale = dm_factory(str(folder), shots=2, seed=1)
    with pytest.raises(ValueError, match="delete the file"):
        stale.setup("fit")


def test_more_shots_than_images_warns_and_takes_all(dm_factory, tmp_path, caplog):
    root = write_class_folders(tmp_path / "small", ["a", "b"], [5, 2])
    dm = dm_factory(str(root), shots=4, seed=1)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert label_counts(dm.train_dataset) == {0: 4, 1: 2}
    assert "fewer than 4 training images" in caplog.text and "'b' (2)" in caplog.text


def test_invalid_shots_rejected(dm_factory, folder):
    with pytest.raises(ValueError, match="shots=0"):
        dm_factory(str(folder), shots=0)


def test_loaders_yield_float_images_and_long_labels(dm_factory, folder):
    dm = dm_factory(str(folder), shots=4, seed=1, batch_size=5)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.float32 and images.shape == (5, 3, 16, 16)
    assert labels.dtype == torch.long and labels.shape == (5,)
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape[1:] == (3, 16, 16)


def test_no_test_split_tests_on_the_unused_train_items(dm_factory, folder):
    dm = dm_factory(str(folder), shots=4, seed=1)
    dm.setup("fit")
    dm.setup("test")
    # 12 per class, 4 train + 4 val drawn from train -> 4 left per class
    assert label_counts(dm.test_dataset) == {c: 4 for c in range(4)}


def test_calibration_loader_is_seeded(dm_factory, folder):
    dm = dm_factory(str(folder), shots=1, calib_images=10, batch_size=4)
    first = torch.cat([x for x, _ in dm.calibration_dataloader()])
    second = torch.cat([x for x, _ in dm.calibration_dataloader()])
    assert first.shape == (10, 3, 16, 16) and torch.equal(first, second)
    assert len(dm.calibration_dataloader(num_images=100).dataset) == 48  # capped at the split size


def test_non_zero_ranks_do_not_write_but_sample_the_same(dm_factory, folder, monkeypatch):
    from p4q_lightning.data import datamodule

    monkeypatch.setattr(datamodule, "global_rank", lambda: 1)
    worker = dm_factory(str(folder), shots=2, seed=5)
    worker.setup("fit")
    assert not worker.split_file.exists()
    monkeypatch.setattr(datamodule, "global_rank", lambda: 0)
    chief = dm_factory(str(folder), shots=2, seed=5)
    chief.setup("fit")
    assert chief.split_file.exists() and chief.split == worker.split


def test_datamodule_is_buildable_from_a_yaml_config(folder, tmp_path):
    """LightningCLI builds the datamodule through jsonargparse from its typed signature."""
    from jsonargparse import ArgumentParser

    from p4q_lightning.data import FewShotDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(FewShotDataModule, "data")
    yaml = (
        f"data:\n  dataset: {folder}\n  shots: 2\n  seed: 3\n  num_workers: 0\n"
        f"  crop_scale: [0.5, 1.0]\n  mean: [0.5, 0.5, 0.5]\n  split_dir: {tmp_path}/s\n"
    )
    cfg = parser.parse_string(yaml)
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, FewShotDataModule)
    assert dm.shots == 2 and dm.crop_scale == (0.5, 1.0) and tuple(dm.hparams.mean) == (0.5,) * 3


def test_val_comes_from_test_when_the_shots_use_up_the_train_split(dm_factory, tmp_path):
    root = tmp_path / "d"
    write_class_folders(root / "train", ["cat", "dog"], 5)
    write_class_folders(root / "test", ["cat", "dog"], 6, seed=1)
    dm = dm_factory(str(root), shots=5)  # every train image is a shot
    dm.setup("fit")
    assert dm.split["val_from"] == "test" and label_counts(dm.val_dataset) == {0: 4, 1: 4}
    assert all(k.startswith("test/") for k in dm.split["val"])
