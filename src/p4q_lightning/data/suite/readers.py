"""Item lists of the suite's datasets, read from exactly the files CoOp's ``DATASETS.md`` names.

Each reader returns the class names (by label) and, per split, the image paths relative to the
dataset folder with their labels, in file order (the order CoOp's few-shot draw depends on):

- ``split_zhou_*.json``: ``{"train"|"val"|"test": [[path, label, class name], ...]}`` with
  paths relative to the image folder; class names come from the train list (Dassl's rule).
- FGVCAircraft: ``variants.txt`` (class names, label = line index) and
  ``images_variant_{train,val,test}.txt`` ("<image id> <variant>", image ``images/<id>.jpg``).
- ImageNet: ``classnames.txt`` ("<wnid> <name>" a line), labels by sorted ``images/train``
  folder, test = ``images/val``.
- ImageNetV2: label folders ``0..N-1`` named after the lines of ``classnames.txt``.
- ImageNet-Sketch/-A/-R: wnid folders, labels over the sorted folders present (200 for -A/-R).

Folders are listed through :func:`~p4q_lightning.data.listing.list_folder` (indexed once).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p4q_lightning.data.listing import Listing, PathChunks, list_folder
from p4q_lightning.data.sources import IMAGE_EXTENSIONS
from p4q_lightning.data.suite.catalog import SuiteDataset

MISSING_SHOWN = 3


class SuiteLayoutError(FileNotFoundError):
    """A dataset folder that does not match CoOp's layout; the message names what is missing."""


@dataclass
class SuiteItems:
    """Class names by label and, per split, (paths relative to the dataset folder, labels);
    listed folders give their paths as :class:`PathChunks`, built on first use."""

    classnames: list[str]
    splits: dict[str, tuple[Sequence[str], list[int]]]
    class_ids: list[str] | None = None  # ImageNet family: the wnid of each label


def read_items(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    """The item lists of ``spec`` in ``folder`` (``$DATA/<spec.folder>``)."""
    readers = {
        "split_json": _read_split_json,
        "aircraft": _read_aircraft,
        "imagenet": _read_imagenet,
        "imagenet_v2": _read_imagenet_v2,
        "wnid_folders": _read_wnid_folders,
    }
    return readers[spec.layout](spec, folder, index_dir)


def spaced(name: str) -> str:
    """CoOp's trainers turn ``_`` into spaces before prompting (``american_bulldog``)."""
    return name.replace("_", " ").strip()


def _join(prefix: str, path: str) -> str:
    path = path.replace("\\", "/").lstrip("/")
    return f"{prefix}/{path}" if prefix else path


def _require_file(spec: SuiteDataset, folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise SuiteLayoutError(
            f"{spec.name}: {path} is missing; {folder} needs {', '.join(spec.needed_files)} "
            "as CoOp's DATASETS.md lays out"
        )
    return path


def _require_dir(spec: SuiteDataset, folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        raise SuiteLayoutError(
            f"{spec.name}: image folder {path} is missing (CoOp's layout: "
            f"{spec.folder}/{name}/ beside {', '.join(spec.needed_files)})"
        )
    return path


def _check_exist(
    spec: SuiteDataset, folder: Path, paths: list[str], source: str, index_dir: Path | None
) -> None:
    """Every path names a listed file; else one error naming the first few missing ones."""
    listings: dict[str, Listing | None] = {}
    missing: list[str] = []
    count = 0
    for path in paths:
        top, _, rest = path.partition("/")
        if top not in listings:
            listings[top] = (
                _images(folder / top, index_dir) if rest and (folder / top).is_dir() else None
            )
        listing = listings[top]
        found = (
            listing.has_file(rest)
            if listing is not None
            else (not rest and (folder / top).is_file())
        )
        if not found:
            count += 1
            if len(missing) < MISSING_SHOWN:
                missing.append(path)
    if count:
        raise SuiteLayoutError(
            f"{spec.name}: {source} names {count} image(s) missing under {folder}: "
            f"{', '.join(missing)}{' ...' if count > len(missing) else ''}; complete the download "
            "(or extract it where CoOp's DATASETS.md says)"
        )


# ---------------------------------------------------------------------------- split_zhou JSON
def _read_split_json(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    assert spec.split_file is not None
    path = _require_file(spec, folder, spec.split_file)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SuiteLayoutError(f"{spec.name}: cannot read {path}: {err}") from err
    if not isinstance(payload, dict) or not all(
        isinstance(payload.get(s), list) for s in ("train", "val", "test")
    ):
        raise SuiteLayoutError(
            f"{spec.name}: {path} is not a split file: expected "
            '{"train": [[path, label, class name], ...], "val": [...], "test": [...]}'
        )
    names: dict[int, str] = {}
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for split in ("train", "val", "test"):
        paths, labels = [], []
        for n, item in enumerate(payload[split]):
            rel, label, classname = _split_item(item, path, split, n)
            paths.append(_join(spec.image_dir, rel))
            labels.append(label)
            if split == "train":
                names.setdefault(label, classname)
        splits[split] = (paths, labels)
    classnames = _classnames_by_label(spec, names, path)
    for split in ("val", "test"):
        bad = sorted({y for y in splits[split][1] if y >= len(classnames)})
        if bad:
            raise SuiteLayoutError(
                f"{spec.name}: {path} has {split} labels without a training item: {bad[:5]}"
            )
    _check_exist(
        spec, folder, [p for s in splits.values() for p in s[0]], spec.split_file, index_dir
    )
    return SuiteItems(classnames, splits)


def _split_item(item: Any, path: Path, split: str, n: int) -> tuple[str, int, str]:
    if (
        isinstance(item, (list, tuple))
        and len(item) == 3
        and isinstance(item[0], str)
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and item[1] >= 0
        and isinstance(item[2], str)
    ):
        return item[0], item[1], item[2]
    raise SuiteLayoutError(
        f"{path}: {split}[{n}] is {item!r}; each item must be [path, label >= 0, class name]"
    )


def _classnames_by_label(spec: SuiteDataset, names: dict[int, str], path: Path) -> list[str]:
    if not names:
        raise SuiteLayoutError(f"{spec.name}: {path} has no training items")
    count = max(names) + 1
    absent = [y for y in range(count) if y not in names]
    if absent:
        raise SuiteLayoutError(
            f"{spec.name}: {path} has labels 0..{count - 1} but no training item of {absent[:5]}"
        )
    return [spaced(names[y]) for y in range(count)]


# ---------------------------------------------------------------------------- FGVCAircraft
def _read_aircraft(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    variants = _require_file(spec, folder, "variants.txt")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    _require_dir(spec, folder, spec.image_dir)
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for split in ("train", "val", "test"):
        name = f"images_variant_{split}.txt"
        text = _require_file(spec, folder, name).read_text()
        paths, labels = [], []
        for n, line in enumerate(text.splitlines(), 1):
            image_id, _, variant = line.strip().partition(" ")
            if not image_id:
                continue
            if variant not in label_of:
                raise SuiteLayoutError(
                    f"{spec.name}: {folder / name} line {n}: variant {variant!r} is not in "
                    "variants.txt"
                )
            paths.append(f"{spec.image_dir}/{image_id}.jpg")
            labels.append(label_of[variant])
        splits[split] = (paths, labels)
    _check_exist(
        spec,
        folder,
        [p for s in splits.values() for p in s[0]],
        "images_variant_*.txt",
        index_dir,
    )
    return SuiteItems([spaced(c) for c in classnames], splits)


# ---------------------------------------------------------------------------- ImageNet family
def read_classnames_txt(spec: SuiteDataset, folder: Path) -> dict[str, str]:
    """``classnames.txt``: "<folder> <class name, may contain spaces>" a line, in file order."""
    path = _require_file(spec, folder, "classnames.txt")
    names: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, name = line.strip().partition(" ")
        if key:
            names[key] = name.strip()
    if not names:
        raise SuiteLayoutError(
            f"{spec.name}: {path} is empty; expected '<wnid> <class name>' lines"
        )
    return names


def _images(folder: Path, index_dir: Path | None) -> Listing:
    """The image files of the tree under ``folder`` (hidden and other files left out)."""
    return list_folder(folder, index_dir, IMAGE_EXTENSIONS)


def _named(spec: SuiteDataset, wnids: list[str], names: dict[str, str], where: Path) -> list[str]:
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise SuiteLayoutError(
            f"{spec.name}: classnames.txt has no line for the folder(s) {unknown[:5]} of {where}"
        )
    return [spaced(names[w]) for w in wnids]


def _read_imagenet(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    names = read_classnames_txt(spec, folder)
    image_dir = _require_dir(spec, folder, spec.image_dir)
    train_dir = _require_dir(spec, image_dir, "train")
    val_dir = _require_dir(spec, image_dir, "val")
    train = _images(train_dir, index_dir)
    wnids = train.subdirs()
    if not wnids:
        raise SuiteLayoutError(f"{spec.name}: {train_dir} has no class folders")
    classnames = _named(spec, wnids, names, train_dir)
    label_of = {w: i for i, w in enumerate(wnids)}
    splits: dict[str, tuple[Sequence[str], list[int]]] = {}
    for split, listing, sub in (("train", train, "train"), ("test", None, "val")):
        listing = listing or _images(val_dir, index_dir)
        extra = [w for w in listing.subdirs() if w not in label_of]
        if extra:
            raise SuiteLayoutError(
                f"{spec.name}: {image_dir / sub} has class folders that train/ lacks: {extra[:5]}"
            )
        paths, labels = PathChunks(), []
        for wnid in listing.subdirs():
            joined, count = listing.joined(wnid)
            paths.add(f"{spec.image_dir}/{sub}/{wnid}/", joined, count)
            labels += [label_of[wnid]] * count
        splits[split] = (paths, labels)
    return SuiteItems(classnames, splits, wnids)


def _read_imagenet_v2(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    names = read_classnames_txt(spec, folder)
    image_dir = _require_dir(spec, folder, spec.image_dir)
    listing = _images(image_dir, index_dir)
    missing = [str(i) for i in range(len(names)) if not listing.has_dir(str(i))]
    if missing:
        raise SuiteLayoutError(
            f"{spec.name}: {image_dir} lacks the label folder(s) {missing[:5]} (one folder 0..."
            f"{len(names) - 1} per line of classnames.txt)"
        )
    paths, labels = PathChunks(), []
    for label in range(len(names)):
        joined, count = listing.joined(str(label))
        paths.add(f"{spec.image_dir}/{label}/", joined, count)
        labels += [label] * count
    return SuiteItems([spaced(n) for n in names.values()], {"test": (paths, labels)}, list(names))


def _read_wnid_folders(spec: SuiteDataset, folder: Path, index_dir: Path | None) -> SuiteItems:
    names = read_classnames_txt(spec, folder)
    image_dir = _require_dir(spec, folder, spec.image_dir)
    listing = _images(image_dir, index_dir)
    wnids = listing.subdirs()  # files beside them (ImageNet-A's README.txt) are not classes
    if not wnids:
        raise SuiteLayoutError(f"{spec.name}: {image_dir} has no class folders")
    classnames = _named(spec, wnids, names, image_dir)
    paths, labels = PathChunks(), []
    for label, wnid in enumerate(wnids):
        joined, count = listing.joined(wnid)
        paths.add(f"{spec.image_dir}/{wnid}/", joined, count)
        labels += [label] * count
    return SuiteItems(classnames, {"test": (paths, labels)}, wnids)
