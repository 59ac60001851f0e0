"""Labelled image sources with named splits: local folders and the synthetic world.

A source knows its class names, prompt templates, the labels of each split and how to decode
one item. Splits are ``train`` (always), ``val`` (optional) and ``test`` (optional; the
datamodule falls back to the train items the few-shot split did not use). The Hugging Face
source lives in ``hub.py``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from p4q_lightning.data.catalog import DEFAULT_TEMPLATES, folder_to_classname, wnid_to_classname

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SKIP_HINT = "pass skip_corrupt=True to skip unreadable images and count them"


class CorruptImageError(RuntimeError):
    """An image that cannot be decoded; the message names the file."""


class UnsupportedImageError(CorruptImageError):
    """A readable image whose pixel values have no 8-bit meaning (e.g. 32-bit integers)."""


# PIL modes of one channel with more than 8 bits: ``convert("RGB")`` clips them at 255 instead
# of scaling, so a 16-bit PNG would become a white image.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")


def to_rgb(img: Image.Image, name: str) -> Image.Image:
    """``img`` as 8-bit RGB, with high-bit-depth grey levels scaled rather than clipped.

    16-bit modes (``I;16*``, and ``I``, which PIL uses for 16-bit PGM and 32-bit TIFF files)
    are divided by 257 (65535 -> 255); float images (``F``) must lie in [0, 1] and are
    multiplied by 255. Values outside those ranges have no 8-bit reading and raise
    :class:`UnsupportedImageError`. 16-bit RGB(A) PNGs already arrive as 8-bit ``RGB(A)``.
    """
    if img.mode not in _WIDE_MODES:
        return img.convert("RGB")
    values = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(values).all()
    low = float(values.min()) if values.size and finite else 0.0
    high = float(values.max()) if values.size and finite else 0.0
    if img.mode == "F":
        fits, top, expected = finite and low >= 0.0 and high <= 1.0, 1.0, "[0, 1]"
    else:
        fits, top, expected = low >= 0 and high <= 65535, 65535.0, "0..65535 (16 bits)"
    if not fits:
        shown = f"[{low:g}, {high:g}]" if finite else "non-finite values"
        raise UnsupportedImageError(
            f"image {name} has {img.mode!r} pixels with {shown}, outside {expected}, so they "
            f"have no 8-bit RGB reading; convert the file to 8-bit (PNG or JPEG), or {SKIP_HINT}"
        )
    grey = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def decode_image(data: str | os.PathLike[str] | bytes, name: str) -> Image.Image:
    """Open a file path or encoded bytes as an 8-bit RGB PIL image (high-bit-depth images
    scaled by :func:`to_rgb`), or raise ``CorruptImageError``."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return to_rgb(img, name)
    except UnsupportedImageError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise CorruptImageError(
            f"cannot read image {name}: {type(err).__name__}: {err}. Replace or delete the file, "
            f"or {SKIP_HINT}"
        ) from err


def require_classes(classnames: Sequence[str], what: str, fix: str) -> None:
    """Refuse a dataset of fewer than two classes before anything starts (a classifier of one
    class fails deep inside the metrics, after the logger has started)."""
    if len(classnames) < 2:
        found = f"only the class {classnames[0]!r}" if classnames else "no class"
        raise ValueError(
            f"{what} has {found}, but classification needs at least two classes; {fix}"
        )


class ImageSource(ABC):
    """A labelled image collection with ``train`` and optional ``val`` / ``test`` splits."""

    name: str
    classnames: list[str]
    templates: list[str]

    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The splits this source has, among ``train``, ``val`` and ``test``."""

    @abstractmethod
    def labels(self, split: str) -> list[int]:
        """Integer labels of every item of ``split``, in item order."""

    @abstractmethod
    def load(self, split: str, index: int) -> Image.Image | torch.Tensor:
        """Decode item ``index`` of ``split`` (RGB PIL image or uint8 [3, H, W] tensor)."""

    def describe(self, split: str, index: int) -> str:
        """A human-readable name of an item, for error messages."""
        return f"{self.name}[{split}][{index}]"

    def keys(self, split: str) -> list[str] | list[int]:
        """Stable ids of the items of ``split`` (stored in the split file)."""
        return list(range(len(self.labels(split))))

    def fingerprint(self) -> str:
        """Changes when the train items change, so a stale split file is detected."""
        return str(len(self.labels("train")))

    @property
    def split_key(self) -> str:
        """What names this dataset in split-file names."""
        return self.name


class FolderSource(ImageSource):
    """Images in class folders: ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``.

    ImageNet layout (``train/<wnid>/*.JPEG`` and ``val/<wnid>/*``) maps the wnids to CLIP's
    class names; any other folder names become class names with ``_`` turned into spaces.
    With ``train`` and ``val`` but no ``test`` folder, ``val`` is the evaluation split (as for
    ImageNet); with all three, ``val`` serves validation.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset folder {self.root} does not exist. Pass an existing image folder, a "
                "Hugging Face hub id (e.g. uoft-cs/cifar10), a dataset saved with "
                "save_to_disk, or 'synthetic'"
            )
        self.name = str(self.root)
        folders = {s: self._split_dir(s) for s in ("train", "val", "test")}
        if folders["train"] is None:
            folders = {"train": self.root, "val": None, "test": None}
        elif folders["test"] is None and folders["val"] is not None:
            folders["test"], folders["val"] = folders["val"], None
        train_dir = folders["train"]
        assert train_dir is not None
        self.class_folders = sorted(
            d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.class_folders:
            raise ValueError(
                f"no class folders in {train_dir}: expected {train_dir}/<class>/<image files> "
                "(for ImageNet: train/<wnid>/*.JPEG and val/<wnid>/*)"
            )
        require_classes(
            self.class_folders,
            f"the image folder {train_dir}",
            "point data.init_args.dataset at the folder that holds one sub-folder per class "
            f"({train_dir}/<class>/<images>), with at least two of them",
        )
        self.classnames = wnid_to_classname(self.class_folders) or [
            folder_to_classname(f) for f in self.class_folders
        ]
        self.templates = list(DEFAULT_TEMPLATES)
        self._items: dict[str, tuple[list[Path], list[int]]] = {}
        for split, folder in folders.items():
            if folder is not None:
                self._items[split] = self._scan(folder, required=split == "train")
        log.info(
            "image folder %s: %d classes, splits %s",
            self.root,
            len(self.classnames),
            {s: len(v[0]) for s, v in self._items.items()},
        )

    def _split_dir(self, split: str) -> Path | None:
        names = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}[split]
        for n in names:
            if (self.root / n).is_dir():
                return self.root / n
        return None

    def _scan(self, folder: Path, required: bool) -> tuple[list[Path], list[int]]:
        paths: list[Path] = []
        labels: list[int] = []
        present = {d.name for d in folder.iterdir() if d.is_dir()}
        loose = [
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if loose and not present:
            raise ValueError(
                f"{folder} holds images directly ({loose[0].name}, ...) but no class folders: "
                f"sort them into {folder}/<class>/ (for ImageNet val: one folder per wnid)"
            )
        unknown = sorted(present - set(self.class_folders))
        if unknown:
            raise ValueError(f"{folder} has class folders that train/ lacks: {unknown[:5]}")
        for label, cls in enumerate(self.class_folders):
            cdir = folder / cls
            if not cdir.is_dir():
                log.warning("split folder %s has no folder for class %r", folder, cls)
                continue
            files = sorted(
                Path(dp) / f
                for dp, _, fs in os.walk(cdir)
                for f in fs
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            )
            if not files:
                message = (
                    f"class folder {cdir} has no images (extensions "
                    f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
                if required:
                    raise ValueError(message)
                log.warning(message)
            paths.extend(files)
            labels.extend([label] * len(files))
        return paths, labels

    def splits(self) -> tuple[str, ...]:
        return tuple(self._items)

    def labels(self, split: str) -> list[int]:
        return self._items[split][1]

    def load(self, split: str, index: int) -> Image.Image:
        path = self._items[split][0][index]
        return decode_image(path, str(path))

    def describe(self, split: str, index: int) -> str:
        return str(self._items[split][0][index])

    def keys(self, split: str) -> list[str]:
        base = self.root
        return [p.relative_to(base).as_posix() for p in self._items[split][0]]

    def fingerprint(self) -> str:
        digest = hashlib.sha1("\n".join(self.keys("train")).encode()).hexdigest()[:16]
        return f"{len(self.labels('train'))}-{digest}"


@dataclass(frozen=True)
class SyntheticArgs:
    """The generated demo world (``data.init_args.synthetic`` in YAML).

    Args:
        world_seed: the synthetic world (``dataset: synthetic:<seed>`` sets it too).
        train_per_class: synthetic training pool per class.
        test_per_class: synthetic test images per class.
    """

    world_seed: int = 0
    train_per_class: int = 64
    test_per_class: int = 50


class SyntheticSource(ImageSource):
    """The synthetic world's classification task: ``train`` pool and held-out ``test`` images.

    Both splits are rendered deterministically from ``world_seed`` (separate generator
    streams) on first use and kept in memory as uint8 tensors.
    """

    def __init__(self, world_seed: int = 0, train_per_class: int = 64, test_per_class: int = 50):
        from p4q_lightning.data.synthetic.task import TEMPLATES, ClassSet

        if train_per_class < 1 or test_per_class < 1:
            raise ValueError("synthetic train_per_class and test_per_class must be positive")
        self.world_seed = int(world_seed)
        self.per_class = {"train": int(train_per_class), "test": int(test_per_class)}
        self.classes = ClassSet()
        self.name = f"synthetic:{self.world_seed}"
        self.classnames = self.classes.classnames
        self.templates = list(TEMPLATES)
        self._images: dict[str, torch.Tensor] = {}

    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def labels(self, split: str) -> list[int]:
        return torch.arange(len(self.classes)).repeat_interleave(self.per_class[split]).tolist()

    def images(self, split: str) -> torch.Tensor:
        """All images of ``split`` as uint8 [N, 3, H, W] (rendered once)."""
        if split not in self._images:
            from p4q_lightning.data.synthetic.task import generate_split

            self._images[split], _ = generate_split(
                self.classes, self.per_class[split], self.world_seed, split
            )
        return self._images[split]

    def load(self, split: str, index: int) -> torch.Tensor:
        return self.images(split)[index]

    def fingerprint(self) -> str:
        return f"{self.name}-{self.per_class['train']}-{len(self.classes)}"

    @property
    def split_key(self) -> str:
        # the pool size is part of the name: another pool size is another dataset
        return f"{self.name}-pool{self.per_class['train']}"


def subset_labels(labels: Sequence[int], indices: Sequence[int]) -> list[int]:
    return [labels[i] for i in indices]
