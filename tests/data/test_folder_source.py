"""Local image folders: ImageNet layout and wnid -> CLIP names, plain class folders, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from data_helpers import WNIDS, write_class_folders, write_image
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from p4q_lightning.data.catalog import imagenet_templates, imagenet_wnids, wnid_to_classname
from p4q_lightning.data.sources import CorruptImageError, FolderSource


def test_imagenet_wnid_list_is_offline_sorted_and_matches_clip_names():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(IMAGENET_CLASSNAMES) and list(wnids) == sorted(wnids)
    assert wnid_to_classname(["n01440764", "n15075141"]) == ["tench", "toilet paper"]
    assert wnid_to_classname(["n01440764", "not_a_wnid"]) is None
    templates = imagenet_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)


def test_imagenet_layout_maps_wnids_and_uses_val_for_test(dm_factory, imagenet_folder):
    dm = dm_factory(str(imagenet_folder), shots=2, seed=1)
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == list(WNIDS.values())
    assert dm.source.splits() == ("train", "test")
    assert len(dm.test_dataset) == 9  # the whole val/ folder: 3 classes x 3
    assert dm.split["val_from"] == "train" and len(dm.val_dataset) == 6
    assert all(k.startswith("train/") for k in dm.split["train"] + dm.split["val"])
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_train_val_test_folders_draw_val_from_val(dm_factory, tmp_path):
    root = tmp_path / "d"
    write_class_folders(root / "train", ["cat", "dog"], 6)
    write_class_folders(root / "val", ["cat", "dog"], 5, seed=1)
    write_class_folders(root / "test", ["cat", "dog"], 2, seed=2)
    dm = dm_factory(str(root), shots=8, seed=1)
    dm.setup(None)
    assert dm.split["val_from"] == "val" and len(dm.val_dataset) == 8
    assert len(dm.train_dataset) == 12 and len(dm.test_dataset) == 4


def test_missing_path_error_names_the_path(dm_factory, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        dm_factory(str(missing)).setup("fit")


def test_empty_class_folder_is_named(tmp_path):
    root = write_class_folders(tmp_path / "d", ["cat", "dog"], 3)
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class has no images"):
        FolderSource(root)


def test_no_class_folders_error(tmp_path):
    write_image(tmp_path / "flat" / "a.png", 0)
    with pytest.raises(ValueError, match="no class folders"):
        FolderSource(tmp_path / "flat")


def test_val_images_without_class_folders_error(tmp_path):
    root = tmp_path / "inet"
    write_class_folders(root / "train", list(WNIDS), 2)
    write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", 0, fmt="JPEG")
    with pytest.raises(ValueError, match="sort them into"):
        FolderSource(root)


def test_fewer_classes_than_expected(dm_factory, imagenet_folder):
    dm = dm_factory(str(imagenet_folder), expected_num_classes=1000)
    with pytest.raises(ValueError, match="has 3 classes but expected_num_classes=1000"):
        dm.setup("fit")


def _corrupt(root, cls="dog"):
    bad = root / cls / "img_001.png"
    bad.write_bytes(b"this is not a png")
    return bad


def test_corrupt_image_error_names_the_file(dm_factory, tmp_path):
    root = write_class_folders(tmp_path / "d", ["cat", "dog"], 3)
    bad = _corrupt(root)
    dm = dm_factory(str(root), shots=3)  # takes every image, so the bad one too
    with pytest.raises(CorruptImageError, match=str(bad)) as info:
        dm.setup("fit")
    assert "skip_corrupt=True" in str(info.value)


def test_skip_corrupt_skips_and_counts(dm_factory, tmp_path, caplog):
    root = write_class_folders(tmp_path / "d", ["cat", "dog"], 3)
    bad = _corrupt(root)
    dm = dm_factory(str(root), shots=3, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.skipped == [str(bad)]
    assert len(dm.train_dataset) == 5
    assert "skipped 1 unreadable train images" in caplog.text


def test_skip_corrupt_in_lazily_decoded_test_split(dm_factory, tmp_path):
    root = tmp_path / "d"
    write_class_folders(root / "train", ["cat", "dog"], 3)
    write_class_folders(root / "test", ["cat", "dog"], 3, seed=1)
    _corrupt(root / "test")
    dm = dm_factory(str(root), shots=1, skip_corrupt=True, batch_size=16)
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape[0] == labels.shape[0] == 5
    strict = dm_factory(str(root), shots=1, split_dir=str(tmp_path / "s2"))
    strict.setup("test")
    with pytest.raises(CorruptImageError, match="img_001.png"):
        list(strict.test_dataloader())


def test_in_memory_images_are_downscaled_once(dm_factory, tmp_path):
    root = tmp_path / "big"
    for cls in ("a", "b"):
        for i in range(2):
            write_image(root / cls / f"{i}.png", i, size=64)
    dm = dm_factory(str(root), shots=2, image_size=16, cache_shorter_side=20)
    dm.setup("fit")
    assert all(min(im.size) == 20 for im in dm.train_dataset.images)
    x, _ = dm.train_dataset[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16)
