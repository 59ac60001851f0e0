"""The 15 CoOp layouts under one root: class names, counts, splits, aliases, DG sets, base/new."""

from __future__ import annotations

import pytest
import suite_layouts as layouts
from data_helpers import label_counts

from p4q_lightning.data.suite import suite_dataset, suite_names

FEW_SHOT = [n for n in suite_names() if not suite_dataset(n).test_only]
TEST_ONLY = [n for n in suite_names() if suite_dataset(n).test_only]


def test_the_suite_is_coops_fifteen_and_names_its_templates():
    assert len(FEW_SHOT) == 11 and TEST_ONLY == [
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ]
    assert suite_dataset("dtd").template == "{} texture."
    assert suite_dataset("eurosat").template == "a centered satellite photo of {}."
    assert suite_dataset("ucf101").template == "a photo of a person doing {}."
    assert suite_dataset("oxford_pets").template == "a photo of a {}, a type of pet."


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("OxfordPets", "oxford_pets"),
        ("DescribableTextures", "dtd"),
        ("FGVCAircraft", "fgvc_aircraft"),
        ("ImageNetV2", "imagenet_v2"),
        ("ImageNetA", "imagenet_a"),
        ("caltech-101", "caltech101"),
        ("Flowers102", "oxford_flowers"),
    ],
)
def test_coop_class_names_are_aliases(alias, name):
    assert suite_dataset(alias).name == name
    assert suite_dataset("uoft-cs/cifar10") is None and suite_dataset("cifar10") is None


@pytest.mark.parametrize("name", suite_names())
def test_each_layout_reads_class_names_counts_and_splits(name, tmp_path, dm_factory):
    expected = layouts.write_dataset(tmp_path / "DATA", name)
    dm = dm_factory(name, root=str(tmp_path / "DATA"), shots=2)
    source = dm.source
    assert source.classnames == expected.classnames
    assert source.templates == [suite_dataset(name).template]
    splits = ("test",) if name in TEST_ONLY else tuple(expected.splits)
    assert source.splits() == splits
    for split in splits:
        pairs = list(zip(source.keys(split), source.labels(split), strict=True))
        assert pairs == expected.splits[split], split  # in the split file's order
    # items decode from the dataset folder (the key is relative to it)
    image = source.load(splits[0], 0)
    assert image.size == (12, 8)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataset) == expected.count("test")
    if name in FEW_SHOT:
        dm.setup("fit")
        assert set(label_counts(dm.train_dataset).values()) == {2}
        val_from = dm.split["val_from"]
        assert val_from == ("train" if name == "imagenet" else "val")


def test_class_names_read_as_coop_prompts_them(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "oxford_pets")
    layouts.write_dataset(tmp_path, "fgvc_aircraft")
    pets = dm_factory("OxfordPets", root=str(tmp_path)).source
    assert pets.classnames == ["abyssinian", "american bulldog", "basset hound"]
    aircraft = dm_factory("fgvc_aircraft", root=str(tmp_path)).source
    assert aircraft.classnames[2] == "Cessna 172"  # variant names keep their spaces


def test_imagenet_a_labels_its_200_class_subset_over_sorted_folders(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "imagenet_a")
    source = dm_factory("imagenet_a", root=str(tmp_path)).source
    assert source.class_ids == list(layouts.DG_SUBSET)  # README.txt beside them is no class
    assert source.classnames == [layouts.IMAGENET[w] for w in layouts.DG_SUBSET]
    assert sorted(set(source.labels("test"))) == [0, 1]


def test_domain_generalisation_sets_are_scored_by_rows_of_the_training_classes(
    tmp_path, dm_factory
):
    for name in ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        layouts.write_dataset(tmp_path, name)
    dm = dm_factory("imagenet", root=str(tmp_path), shots=2, test_datasets=TEST_ONLY)
    dm.prepare_data()
    dm.setup("test")
    sets = {t.name: t for t in dm.test_sets}
    assert list(sets) == ["imagenet", *TEST_ONLY]
    wnids = list(layouts.IMAGENET)
    assert sets["imagenet_v2"].class_index == (0, 1, 2, 3)
    assert sets["imagenet_sketch"].class_index == (0, 1, 2, 3)
    subset = tuple(wnids.index(w) for w in layouts.DG_SUBSET)
    assert sets["imagenet_a"].class_index == sets["imagenet_r"].class_index == subset == (1, 3)
    assert not any(t.retarget for t in dm.test_sets)
    loaders = dm.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [8, 8, 8, 4, 4]


def test_cross_dataset_sets_keep_their_own_class_names_and_template(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "oxford_pets")
    layouts.write_dataset(tmp_path, "dtd")
    dm = dm_factory("oxford_pets", root=str(tmp_path), shots=1, test_datasets=["dtd"])
    dm.prepare_data()
    dm.setup("test")
    own, dtd = dm.test_sets
    assert own.name == "oxford_pets" and own.templates == ("a photo of a {}, a type of pet.",)
    assert dtd.retarget and dtd.class_index is None
    assert dtd.classnames == ("banded", "blotchy", "braided")
    assert dtd.templates == ("{} texture.",)


@pytest.mark.parametrize("n_classes", [4, 5])
def test_base_and_new_halves_relabel_in_sorted_order(tmp_path, dm_factory, n_classes):
    classes = [f"class_{c}" for c in range(n_classes)]
    counts = {
        "train": [4] * n_classes,
        "val": [2] * n_classes,
        "test": [3 + c for c in range(n_classes)],
    }
    layouts.write_split_json(tmp_path, "dtd", counts, classes)
    m = -(-n_classes // 2)  # ceil(n / 2): the odd class goes to base
    full = dm_factory("dtd", root=str(tmp_path), shots=2)
    full.prepare_data()
    full.setup()
    for which, kept in (("base", range(m)), ("new", range(m, n_classes))):
        dm = dm_factory("dtd", root=str(tmp_path), shots=2, subsample_classes=which)
        dm.setup()
        assert dm.classnames == [f"class {c}" for c in kept]
        assert label_counts(dm.train_dataset) == {i: 2 for i in range(len(kept))}
        assert label_counts(dm.val_dataset) == {i: 2 for i in range(len(kept))}
        assert label_counts(dm.test_dataset) == {i: 3 + c for i, c in enumerate(kept)}
        # the same few-shot images as the run on all classes, only those of the kept classes
        full_train = {k for k in full.split["train"]}
        assert set(dm.run_split.drawn("train")) <= full_train
        assert dm.split == full.split
    base = dm_factory("dtd", root=str(tmp_path), shots=2, subsample_classes="base")
    base.setup("test")
    own, new = base.test_sets
    assert (own.name, new.name) == ("base", "new") and new.retarget
    assert new.classnames == tuple(f"class {c}" for c in range(m, n_classes))
    assert label_counts(base.test_dataloader()[1].dataset) == {
        i: 3 + c for i, c in enumerate(range(m, n_classes))
    }
