"""Generated ``$DATA`` folders in CoOp's layout (``DATASETS.md``), a few tiny images each.

``write_dataset(root, name)`` writes one of the 15 suite datasets and returns what a test
should find: class names by label and, per split, the paths (relative to the dataset folder)
with their labels. Split-file datasets list their train items in a shuffled order, so the
order in which labels first appear differs from the sorted one (CoOp's draw depends on it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from data_helpers import write_image

# four real ImageNet wnids with CLIP's names; ImageNet-A/-R hold a subset of them
IMAGENET = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
}
DG_SUBSET = ("n01443537", "n01491361")


@dataclass
class Expected:
    """What the reader of a generated dataset must return."""

    folder: str
    classnames: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.splits.get(split, []))


_counter = [0]


def _image(path: Path, fmt: str = "JPEG") -> None:
    _counter[0] += 1
    write_image(path, _counter[0], size=8, fmt=fmt)


# class names as CoOp's split files store them (underscores become spaces when read)
JSON_CLASSES = {
    "caltech101": ["accordion", "airplane", "face"],
    "oxford_pets": ["abyssinian", "american_bulldog", "basset_hound"],
    "stanford_cars": ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Audi R8"],
    "oxford_flowers": ["pink primrose", "globe thistle", "hard-leaved pocket orchid"],
    "food101": ["apple_pie", "baby_back_ribs", "baklava"],
    "sun397": ["abbey", "airplane_cabin", "airport_terminal"],
    "dtd": ["banded", "blotchy", "braided"],
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"],
    "ucf101": ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"],
}
JSON_FILES = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def write_split_json(
    root: Path,
    name: str,
    per_class: dict[str, list[int]] | None = None,
    classes: list[str] | None = None,
    seed: int = 0,
) -> Expected:
    """A split_zhou dataset; ``per_class[split][label]`` images of each class."""
    folder, image_dir, split_file = JSON_FILES[name]
    classes = classes or JSON_CLASSES[name]
    per_class = per_class or {
        "train": [5] * len(classes),
        "val": [2] * len(classes),
        "test": [3] * len(classes),
    }
    base = root / folder
    payload: dict[str, list[list]] = {}
    expected = Expected(folder, [c.replace("_", " ") for c in classes])
    rng = random.Random(seed)
    for split, counts in per_class.items():
        items = []
        for label, n in enumerate(counts):
            for i in range(n):
                if name == "stanford_cars":  # paths relative to the dataset folder itself
                    top = "cars_test" if split == "test" else "cars_train"
                    rel = f"{top}/{label:02d}{split}{i:03d}.jpg"
                else:
                    rel = f"{classes[label].replace(' ', '_')}/{split}_{i:03d}.jpg"
                items.append([rel, label, classes[label]])
        if split == "train":
            rng.shuffle(items)  # labels first appear in an order that is not the sorted one
        for rel, label, _ in items:
            full = f"{image_dir}/{rel}" if image_dir else rel
            _image(base / full)
            expected.splits.setdefault(split, []).append((full, label))
        payload[split] = items
    (base / split_file).write_text(json.dumps(payload))
    return expected


AIRCRAFT = ["707-320", "A300B4", "Cessna 172"]  # one variant name with a space


def write_aircraft(root: Path, per_split: dict[str, int] | None = None) -> Expected:
    base = root / "fgvc_aircraft"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    expected = Expected("fgvc_aircraft", list(AIRCRAFT))
    image_id = 1000000
    for split, n in (per_split or {"train": 4, "val": 2, "test": 3}).items():
        lines = []
        for label, variant in enumerate(AIRCRAFT):
            for _ in range(n):
                image_id += 1
                _image(base / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}")
                expected.splits.setdefault(split, []).append((f"images/{image_id}.jpg", label))
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return expected


def _classnames_txt(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET.items()))


def write_imagenet(root: Path, train: int = 6, val: int = 2) -> Expected:
    base = root / "imagenet"
    _classnames_txt(base)
    expected = Expected("imagenet", list(IMAGENET.values()))
    for split, sub, n in (("train", "train", train), ("test", "val", val)):
        for label, wnid in enumerate(IMAGENET):
            for i in range(n):
                rel = f"images/{sub}/{wnid}/{wnid}_{i}.JPEG"
                _image(base / rel)
                expected.splits.setdefault(split, []).append((rel, label))
    return expected


def write_imagenet_v2(root: Path, per_class: int = 2) -> Expected:
    base = root / "imagenetv2"
    _classnames_txt(base)
    image_dir = "imagenetv2-matched-frequency-format-val"
    expected = Expected("imagenetv2", list(IMAGENET.values()))
    for label in range(len(IMAGENET)):
        for i in range(per_class):
            rel = f"{image_dir}/{label}/{i:04d}.jpeg"
            _image(base / rel)
            expected.splits.setdefault("test", []).append((rel, label))
    return expected


def write_wnid_folders(root: Path, name: str, per_class: int = 2) -> Expected:
    folder, image_dir, wnids = {
        "imagenet_sketch": ("imagenet-sketch", "images", tuple(IMAGENET)),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", DG_SUBSET),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", DG_SUBSET),
    }[name]
    base = root / folder
    _classnames_txt(base)  # CoOp copies ImageNet's full classnames.txt beside each variant
    expected = Expected(folder, [IMAGENET[w] for w in wnids])
    (base / image_dir).mkdir(parents=True)
    (base / image_dir / "README.txt").write_text("not a class")  # ImageNet-A ships one
    for label, wnid in enumerate(wnids):
        for i in range(per_class):
            rel = f"{image_dir}/{wnid}/{i:03d}.jpg"
            _image(base / rel, fmt="PNG")  # ImageNet-R holds PNG bytes in .jpg files too
            expected.splits.setdefault("test", []).append((rel, label))
    return expected


def write_dataset(root: Path, name: str) -> Expected:
    """One suite dataset (by its suite name) under ``root`` with a few images per class."""
    if name in JSON_FILES:
        return write_split_json(root, name)
    if name == "fgvc_aircraft":
        return write_aircraft(root)
    if name == "imagenet":
        return write_imagenet(root)
    if name == "imagenet_v2":
        return write_imagenet_v2(root)
    return write_wnid_folders(root, name)
