"""The few-shot CLIP benchmark suite: CoOp's 15 datasets, their folders, files and prompts.

Every prompt-learning paper since CoOp reads these datasets from one ``$DATA`` root laid out as
CoOp's ``DATASETS.md`` describes; the names here are the ones users type, CoOp's class names
(``OxfordPets``) are aliases. The template is CoOp's hand-written zero-shot prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Layout = Literal["split_json", "aircraft", "imagenet", "imagenet_v2", "wnid_folders"]


@dataclass(frozen=True)
class SuiteDataset:
    """Where one dataset lives under ``$DATA`` and how its items are listed.

    Args:
        name: the name users type (``oxford_pets``).
        coop_name: CoOp's class name (``OxfordPets``), accepted as an alias.
        folder: the dataset folder under ``$DATA``.
        image_dir: the image folder inside it that split-file paths are relative to
            (empty: the dataset folder itself, as for StanfordCars).
        layout: ``split_json`` (a ``split_zhou_*.json``), ``aircraft`` (FGVCAircraft's text
            files), ``imagenet`` (class folders + ``classnames.txt``), ``imagenet_v2`` (label
            folders ``0..N-1`` + ``classnames.txt``), ``wnid_folders`` (test-only wnid folders +
            ``classnames.txt``).
        template: CoOp's hand-written prompt template.
        split_file: the ``split_zhou_*.json`` of a ``split_json`` dataset.
        domain_of: for a domain-generalisation test set, the dataset whose classes it shares;
            it is evaluated with the training classifier restricted to its classes.
        aliases: further names accepted (besides ``name``, ``coop_name`` and ``folder``).
    """

    name: str
    coop_name: str
    folder: str
    image_dir: str
    layout: Layout
    template: str
    split_file: str | None = None
    domain_of: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def test_only(self) -> bool:
        """ImageNetV2, -Sketch, -A and -R have no training split."""
        return self.domain_of is not None

    @property
    def needed_files(self) -> tuple[str, ...]:
        """What the dataset folder must hold besides the images (for error messages)."""
        if self.layout == "split_json":
            return (str(self.split_file),)
        if self.layout == "aircraft":
            return ("variants.txt", *(f"images_variant_{s}.txt" for s in ("train", "val", "test")))
        return ("classnames.txt",)


PHOTO = "a photo of a {}."

SUITE: tuple[SuiteDataset, ...] = (
    SuiteDataset("imagenet", "ImageNet", "imagenet", "images", "imagenet", PHOTO),
    SuiteDataset(
        "caltech101",
        "Caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_json",
        PHOTO,
        "split_zhou_Caltech101.json",
    ),
    SuiteDataset(
        "oxford_pets",
        "OxfordPets",
        "oxford_pets",
        "images",
        "split_json",
        "a photo of a {}, a type of pet.",
        "split_zhou_OxfordPets.json",
    ),
    SuiteDataset(
        "stanford_cars",
        "StanfordCars",
        "stanford_cars",
        "",
        "split_json",
        PHOTO,
        "split_zhou_StanfordCars.json",
    ),
    SuiteDataset(
        "oxford_flowers",
        "OxfordFlowers",
        "oxford_flowers",
        "jpg",
        "split_json",
        "a photo of a {}, a type of flower.",
        "split_zhou_OxfordFlowers.json",
        aliases=("flowers102",),
    ),
    SuiteDataset(
        "food101",
        "Food101",
        "food-101",
        "images",
        "split_json",
        "a photo of {}, a type of food.",
        "split_zhou_Food101.json",
    ),
    SuiteDataset(
        "fgvc_aircraft",
        "FGVCAircraft",
        "fgvc_aircraft",
        "images",
        "aircraft",
        "a photo of a {}, a type of aircraft.",
    ),
    SuiteDataset(
        "sun397", "SUN397", "sun397", "SUN397", "split_json", PHOTO, "split_zhou_SUN397.json"
    ),
    SuiteDataset(
        "dtd",
        "DescribableTextures",
        "dtd",
        "images",
        "split_json",
        "{} texture.",
        "split_zhou_DescribableTextures.json",
    ),
    SuiteDataset(
        "eurosat",
        "EuroSAT",
        "eurosat",
        "2750",
        "split_json",
        "a centered satellite photo of {}.",
        "split_zhou_EuroSAT.json",
    ),
    SuiteDataset(
        "ucf101",
        "UCF101",
        "ucf101",
        "UCF-101-midframes",
        "split_json",
        "a photo of a person doing {}.",
        "split_zhou_UCF101.json",
    ),
    SuiteDataset(
        "imagenet_v2",
        "ImageNetV2",
        "imagenetv2",
        "imagenetv2-matched-frequency-format-val",
        "imagenet_v2",
        PHOTO,
        domain_of="imagenet",
    ),
    SuiteDataset(
        "imagenet_sketch",
        "ImageNetSketch",
        "imagenet-sketch",
        "images",
        "wnid_folders",
        PHOTO,
        domain_of="imagenet",
    ),
    SuiteDataset(
        "imagenet_a",
        "ImageNetA",
        "imagenet-adversarial",
        "imagenet-a",
        "wnid_folders",
        PHOTO,
        domain_of="imagenet",
    ),
    SuiteDataset(
        "imagenet_r",
        "ImageNetR",
        "imagenet-rendition",
        "imagenet-r",
        "wnid_folders",
        PHOTO,
        domain_of="imagenet",
    ),
)


def _normal(name: str) -> str:
    """``OxfordPets``, ``oxford_pets`` and ``oxford-pets`` all become ``oxfordpets``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NAME: dict[str, SuiteDataset] = {
    _normal(alias): d for d in SUITE for alias in (d.name, d.coop_name, d.folder, *d.aliases)
}


def suite_dataset(name: str) -> SuiteDataset | None:
    """The suite dataset a name means (its name, CoOp class name or folder), else None."""
    if not isinstance(name, str) or "/" in name or "\\" in name:
        return None
    return _BY_NAME.get(_normal(name))


def suite_names() -> list[str]:
    """The 15 names, in CoOp's order (the 11 few-shot datasets, then the 4 test-only ones)."""
    return [d.name for d in SUITE]
