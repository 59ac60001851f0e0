"""The few-shot draw of a suite dataset is CoOp's, image for image.

The reference below is written from the rule (Dassl's ``generate_fewshot_dataset`` as CoOp
calls it), independently of the package: Python's global ``random`` seeded once with the run
seed, train drawn before val, items grouped by label in first-seen order, ``random.sample``
for every group of *at least* k items. The generated split file has a class with exactly k
items and one with k - 1, where a draw that skipped ``sample`` at exactly k would differ.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import suite_layouts as layouts

PAIRS = [(1, 1), (2, 1), (4, 2), (8, 3), (16, 1)]


def coop_reference(items: list[list], k: int, at_least: bool = True) -> list[list]:
    tracker: dict[int, list[list]] = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    out: list[list] = []
    for group in tracker.values():
        enough = len(group) >= k if at_least else len(group) > k
        out.extend(random.sample(group, k) if enough else group)
    return out


def reference_split(payload: dict, shots: int, seed: int, at_least: bool = True):
    random.seed(seed)  # CoOp's set_random_seed, before the dataset is built
    train = coop_reference(payload["train"], shots, at_least)
    val = coop_reference(payload["val"], min(shots, 4), at_least)
    return [f"images/{p}" for p, _, _ in train], [f"images/{p}" for p, _, _ in val]


def counts_for(shots: int) -> dict[str, list[int]]:
    """Class sizes around k: exactly k, k - 1 (when positive), and more."""
    val_k = min(shots, 4)
    train = [shots + 3, shots, *([shots - 1] if shots > 1 else []), 2 * shots + 1]
    val = [val_k + 2, val_k, *([val_k - 1] if val_k > 1 else []), val_k + 1]
    val += [val_k] * (len(train) - len(val))
    return {"train": train, "val": val, "test": [2] * len(train)}


def write_dataset(root, shots: int, seed: int) -> dict:
    """A dtd split file whose train labels first appear as 1 (exactly k items), then the
    others in descending order: not the sorted order, and the exactly-k class is drawn first."""
    counts = counts_for(shots)
    classes = [f"texture_{c}" for c in range(len(counts["train"]))]
    layouts.write_split_json(root, "dtd", counts, classes, seed=seed)
    path = root / "dtd" / "split_zhou_DescribableTextures.json"
    payload = json.loads(path.read_text())
    rank = {1: -1}
    payload["train"].sort(key=lambda item: rank.get(item[1], -item[1] + 100))
    path.write_text(json.dumps(payload))
    return payload


@pytest.mark.parametrize(("shots", "seed"), PAIRS)
def test_train_and_val_shots_are_coops(tmp_path, dm_factory, shots, seed):
    payload = write_dataset(tmp_path, shots, seed)
    first_seen = list(dict.fromkeys(label for _, label, _ in payload["train"]))
    assert first_seen[0] == 1 and first_seen != sorted(first_seen)
    train, val = reference_split(payload, shots, seed)
    # on this file, a draw that skipped ``sample`` for the class of exactly k would differ
    assert (train, val) != reference_split(payload, shots, seed, at_least=False)

    dm = dm_factory("dtd", root=str(tmp_path), shots=shots, seed=seed)
    dm.prepare_data()
    assert dm.split_file.is_file()
    written = json.loads(dm.split_file.read_text())
    assert written["train"] == train  # same images, in CoOp's order
    assert written["val"] == val
    assert written["draw"] == "coop" and written["val_from"] == "val"


def test_imagenet_draws_train_only_as_coop_does(tmp_path, dm_factory):
    layouts.write_imagenet(tmp_path, train=9, val=2)
    dm = dm_factory("ImageNet", root=str(tmp_path), shots=4, seed=2)
    dm.prepare_data()
    keys = dm.source.keys("train")
    items = [[k, y, ""] for k, y in zip(keys, dm.source.labels("train"), strict=True)]
    random.seed(2)
    expected = [k for k, _, _ in coop_reference(items, 4)]
    split = json.loads(dm.split_file.read_text())
    assert split["train"] == expected
    # CoOp validates on the test set; here 4-shot val comes from the unused train images
    assert split["val_from"] == "train" and not set(split["val"]) & set(expected)
