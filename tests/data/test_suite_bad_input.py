"""Bad suite input: one line naming the problem and the fix, before anything is written."""

from __future__ import annotations

import json

import pytest
import suite_layouts as layouts

from p4q_lightning.data.suite.readers import SuiteLayoutError


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def nothing_written(tmp_path) -> bool:
    """No split file (folder listings may be indexed: they describe the folder as it is)."""
    return not list((tmp_path / "splits").glob("*.json"))


def test_a_missing_dataset_folder_names_the_folder_and_the_file_it_needs(tmp_path, dm_factory):
    (tmp_path / "DATA").mkdir()
    dm = dm_factory("OxfordPets", root=str(tmp_path / "DATA"))
    with pytest.raises(SuiteLayoutError) as err:
        dm.prepare_data()
    line = one_line(err)
    assert f"no folder {tmp_path / 'DATA' / 'oxford_pets'}" in line
    assert "images/" in line and "split_zhou_OxfordPets.json" in line
    assert nothing_written(tmp_path)


def test_a_missing_split_file_is_named(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "eurosat")
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(SuiteLayoutError) as err:
        dm_factory("eurosat", root=str(tmp_path)).prepare_data()
    assert "split_zhou_EuroSAT.json is missing" in one_line(err)


def test_a_split_file_naming_missing_images_names_the_first_few(tmp_path, dm_factory):
    expected = layouts.write_dataset(tmp_path, "food101")
    gone = [path for path, _ in expected.splits["test"][:4]]
    for path in gone:
        (tmp_path / "food-101" / path).unlink()
    with pytest.raises(SuiteLayoutError) as err:
        dm_factory("food101", root=str(tmp_path)).prepare_data()
    line = one_line(err)
    assert "split_zhou_Food101.json names 4 image(s) missing" in line
    assert all(p in line for p in gone[:3]) and gone[3] not in line
    assert nothing_written(tmp_path)


def test_a_malformed_split_file_says_what_an_item_is(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    payload = json.loads(path.read_text())
    payload["train"][0] = ["a.jpg", "zero", "banded"]
    path.write_text(json.dumps(payload))
    with pytest.raises(SuiteLayoutError, match=r"must be \[path, label >= 0, class name\]"):
        dm_factory("dtd", root=str(tmp_path)).prepare_data()


def test_a_test_only_dataset_asked_to_train_says_so(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "imagenet_sketch")
    dm = dm_factory("imagenet_sketch", root=str(tmp_path))
    dm.prepare_data()  # draws nothing
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    line = one_line(err)
    assert "imagenet_sketch is a test-only dataset" in line and "train on imagenet" in line
    assert nothing_written(tmp_path)
    dm.setup("test")  # testing on it (e.g. zero-shot) is fine
    assert len(dm.test_dataset) == 8


def test_a_suite_name_without_root_asks_for_it(tmp_path, dm_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        dm_factory("oxford_pets").prepare_data()
    assert "pass the folder holding oxford_pets/ as data.init_args.root" in one_line(err)


def test_an_unset_dataset_is_named(dm_factory):
    with pytest.raises(ValueError, match="data.init_args.dataset is not set"):
        dm_factory(None)


def test_a_dg_set_whose_classes_are_not_training_classes_says_which(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "oxford_pets")
    layouts.write_dataset(tmp_path, "imagenet_a")
    dm = dm_factory("oxford_pets", root=str(tmp_path), test_datasets=["imagenet_a"])
    dm.prepare_data()
    with pytest.raises(ValueError) as err:
        dm.setup("fit")  # at fit already, not after training
    line = one_line(err)
    assert "imagenet_a is a domain-generalisation set of imagenet" in line
    assert "2 of its 2 classes are not training classes of oxford_pets" in line
    assert "'goldfish'" in line and "train on imagenet" in line


def test_a_test_set_listed_twice_is_refused(tmp_path, dm_factory):
    layouts.write_dataset(tmp_path, "oxford_pets")
    layouts.write_dataset(tmp_path, "dtd")
    dm = dm_factory("oxford_pets", root=str(tmp_path), test_datasets=["dtd", "DescribableTextures"])
    dm.prepare_data()
    with pytest.raises(ValueError, match="test_datasets names dtd twice"):
        dm.setup("fit")
