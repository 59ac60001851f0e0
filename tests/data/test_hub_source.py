"""Hugging Face sources offline: the imagefolder builder, saved datasets, known hub ids."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from data_helpers import label_counts, write_class_folders
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from p4q_lightning.data.catalog import CIFAR10_CLASSNAMES, CIFAR100_CLASSNAMES, known_hub_dataset
from p4q_lightning.data.hub import HubSource


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(n)]


def _dataset(
    labels: list[int],
    names: list[str],
    image_col: str = "image",
    label_col: str = "label",
    seed: int = 0,
) -> datasets.Dataset:
    features = datasets.Features(
        {image_col: datasets.Image(), label_col: datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {image_col: _images(len(labels), seed), label_col: labels}, features=features
    )


def test_imagefolder_builder(dm_factory, tmp_path):
    root = tmp_path / "hf_folder"
    write_class_folders(root / "train", ["sea_lion", "hermit_crab"], 6)
    write_class_folders(root / "test", ["sea_lion", "hermit_crab"], 2, seed=1)
    dm = dm_factory(
        "imagefolder",
        hub={"data_dir": str(root), "cache_dir": str(tmp_path / "hf_cache")},
        shots=4,
        seed=1,
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == ["hermit crab", "sea lion"]
    assert label_counts(dm.train_dataset) == {0: 4, 1: 4}
    assert label_counts(dm.val_dataset) == {0: 2, 1: 2}  # rest of train: 6 - 4
    assert len(dm.test_dataset) == 4
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1]


def test_load_from_disk_with_validation_split(dm_factory, tmp_path):
    names = ["left_hand", "right_hand", "foot"]
    dsd = datasets.DatasetDict(
        train=_dataset([0, 1, 2] * 5, names),
        validation=_dataset([0, 1, 2] * 2, names, seed=1),
    )
    path = tmp_path / "saved"
    dsd.save_to_disk(str(path))
    dm = dm_factory(str(path), shots=2, seed=4)
    dm.setup(None)
    assert dm.classnames == ["left hand", "right hand", "foot"]
    # With only train + validation, validation is the evaluation split; val comes from train.
    assert dm.source.splits() == ("train", "test") and dm.split["val_from"] == "train"
    assert len(dm.test_dataset) == 6 and label_counts(dm.train_dataset) == {0: 2, 1: 2, 2: 2}


def test_known_hub_ids_have_columns_names_and_templates():
    ids = ("uoft-cs/cifar10", "uoft-cs/cifar100", "ILSVRC/imagenet-1k")
    c10, c100, inet = (known_hub_dataset(i) for i in ids)
    assert (c10.image_column, c10.label_column, c10.test_split) == ("img", "label", "test")
    assert (c100.image_column, c100.label_column) == ("img", "fine_label")
    assert len(CIFAR10_CLASSNAMES) == 10 and len(CIFAR100_CLASSNAMES) == 100
    assert len(set(CIFAR100_CLASSNAMES)) == 100 and "crab" in CIFAR100_CLASSNAMES
    assert (inet.label_column, inet.test_split) == ("label", "validation")
    assert len(inet.classnames) == 1000 and len(inet.templates) == 80
    assert len(c10.templates) == 18 and known_hub_dataset("cifar10") == c10
    assert known_hub_dataset("someone/other-data") is None


def test_hub_id_path_uses_catalogue(monkeypatch):
    """The load_dataset path with a known id (network replaced by an in-memory dataset)."""
    raw = datasets.DatasetDict(
        train=_dataset(list(range(100)) * 2, [f"n{i}" for i in range(100)], "img", "fine_label"),
        test=_dataset(list(range(100)), [f"n{i}" for i in range(100)], "img", "fine_label", seed=1),
    )
    raw = raw.map(lambda b: {"coarse_label": [0] * len(b["img"])}, batched=True)
    calls = []
    fake_open = staticmethod(lambda spec, *a: calls.append(spec) or raw)
    monkeypatch.setattr(HubSource, "_open", fake_open)
    src = HubSource("uoft-cs/cifar100")
    assert calls == ["uoft-cs/cifar100"]
    assert src.classnames == list(CIFAR100_CLASSNAMES) and len(src.templates) == 18
    assert src.label_column == "fine_label" and src.labels("test")[:3] == [0, 1, 2]
    assert src.load("train", 5).size == (10, 10)


def test_imagenet_style_unlabelled_test_split_is_not_used(monkeypatch):
    names = [f"c{i}" for i in range(1000)]
    raw = datasets.DatasetDict(
        train=_dataset([0, 1, 2, 3], names),
        validation=_dataset([0, 1, 2, 3], names, seed=1),
        test=datasets.Dataset.from_dict({"image": _images(2), "label": [-1, -1]}),
    )
    monkeypatch.setattr(HubSource, "_open", staticmethod(lambda *a: raw))
    src = HubSource("ILSVRC/imagenet-1k")
    assert src._splits == {"train": "train", "test": "validation"}
    assert src.classnames == list(IMAGENET_CLASSNAMES)
    generic = HubSource("someone/imagenet-copy")  # not in the catalogue: detect labelled split
    assert generic._splits["test"] == "validation" and generic.classnames[:2] == ["c0", "c1"]


def test_unreachable_hub_id_error_explains(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expected = "could not load the Hugging Face dataset 'uoft-cs/cifar10'"
    with pytest.raises(RuntimeError, match=expected):
        HubSource("uoft-cs/cifar10")


def test_missing_columns_error(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="image_column"):
        HubSource(str(tmp_path / "t"))
