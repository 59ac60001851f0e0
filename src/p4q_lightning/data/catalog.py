"""Class names and prompt templates per dataset, and the ImageNet wnid order.

ImageNet names and the 80 templates come from ``open_clip.zero_shot_metadata`` (CLIP's
curated names, in the standard sorted-wnid order); the wnid list itself comes from timm
(a dependency of open_clip), which ships it offline. CIFAR names and the 18 CIFAR templates
are the ones CLIP published in its ``data/prompts.md``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

WNID_PATTERN = re.compile(r"^n\d{8}$")

CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

CIFAR10_CLASSNAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# The standard CIFAR-100 fine-label order (alphabetical), with CLIP's spacing.
CIFAR100_CLASSNAMES = (
    "apple",
    "aquarium fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak tree",
    "orange",
    "orchid",
    "otter",
    "palm tree",
    "pear",
    "pickup truck",
    "pine tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow tree",
    "wolf",
    "woman",
    "worm",
)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet templates as format strings (open_clip stores them as lambdas)."""
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k wnids in the standard (sorted) order, read from timm's copy."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as err:  # pragma: no cover - timm is a dependency of open_clip
        raise ImportError(
            "the ImageNet wnid list comes from timm (installed with open_clip_torch); "
            "install timm or name the class folders yourself"
        ) from err
    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != len(IMAGENET_CLASSNAMES) or list(wnids) != sorted(wnids):
        raise RuntimeError("timm's ImageNet-1k wnid list is not the 1,000 sorted wnids")
    return wnids


def wnid_to_classname(wnids: list[str]) -> list[str] | None:
    """CLIP class names for ImageNet wnids, or None when some folder is not an ImageNet wnid."""
    if not wnids or not all(WNID_PATTERN.match(w) for w in wnids):
        return None
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    if any(w not in index for w in wnids):
        return None
    return [IMAGENET_CLASSNAMES[index[w]] for w in wnids]


def folder_to_classname(folder: str) -> str:
    """A readable class name from a folder name: underscores become spaces."""
    return folder.replace("_", " ").strip()


@dataclass(frozen=True)
class HubDataset:
    """What we know about a hub dataset: its columns, splits, names and templates."""

    image_column: str
    label_column: str
    train_split: str
    test_split: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


# Keyed by the hub id's name part, so "uoft-cs/cifar10" and the legacy "cifar10" both match.
KNOWN_HUB_DATASETS: dict[str, HubDataset] = {
    # ILSVRC/imagenet-1k: the test split is unlabelled (label -1); evaluate on validation.
    "imagenet-1k": HubDataset(
        "image", "label", "train", "validation", IMAGENET_CLASSNAMES, tuple(imagenet_templates())
    ),
    "cifar10": HubDataset("img", "label", "train", "test", CIFAR10_CLASSNAMES, CIFAR_TEMPLATES),
    "cifar100": HubDataset(
        "img", "fine_label", "train", "test", CIFAR100_CLASSNAMES, CIFAR_TEMPLATES
    ),
}


def known_hub_dataset(dataset_id: str) -> HubDataset | None:
    """The catalogue entry of a hub id such as ``uoft-cs/cifar100``, if we know it."""
    return KNOWN_HUB_DATASETS.get(dataset_id.rstrip("/").rsplit("/", 1)[-1].lower())
