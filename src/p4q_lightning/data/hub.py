"""Hugging Face ``datasets`` sources: hub ids, builders such as ``imagefolder``, saved datasets.

Images are read undecoded (``Image(decode=False)``) and decoded here, so an unreadable file
is reported by name and can be skipped; labels are read as one column without touching the
images. Known hub ids (ImageNet-1k, CIFAR-10/100) get CLIP's class names and templates.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from p4q_lightning.data.catalog import DEFAULT_TEMPLATES, folder_to_classname, known_hub_dataset
from p4q_lightning.data.sources import ImageSource, decode_image, require_classes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubArgs:
    """Options of a Hugging Face ``datasets`` source (``data.init_args.hub`` in YAML); every
    one is detected when left unset.

    Args:
        data_dir: Hugging Face ``data_dir`` (e.g. with the ``imagefolder`` builder).
        config: Hugging Face dataset config name (None: detected).
        image_column: the image column (None: detected).
        label_column: the label column (None: detected).
        train_split: the hub split to sample shots from (None: detected).
        val_split: the hub split for validation (None: detected).
        test_split: the hub split for testing (None: detected).
        cache_dir: Hugging Face datasets cache directory.
    """

    data_dir: str | None = None
    config: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    cache_dir: str | None = None


_VAL_NAMES = ("validation", "valid", "val")
_TEST_NAMES = ("test", *_VAL_NAMES)


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


class HubSource(ImageSource):
    """A dataset loaded with ``datasets.load_dataset`` (hub id or builder) or ``load_from_disk``.

    ``spec`` is a hub id (``uoft-cs/cifar100``), a builder name with ``data_dir``
    (``imagefolder``), or the folder of a saved dataset. Column and split names are detected
    (the first ``Image`` feature, ``label`` or the first ``ClassLabel``; ``test`` else
    ``validation`` for evaluation) unless given.
    """

    @classmethod
    def from_args(cls, spec: str, hub: HubArgs) -> HubSource:
        """The source of ``spec`` with the ``data.init_args.hub`` option group."""
        return cls(
            spec,
            hub.data_dir,
            hub.config,
            hub.image_column,
            hub.label_column,
            hub.train_split,
            hub.val_split,
            hub.test_split,
            hub.cache_dir,
        )

    def __init__(
        self,
        spec: str,
        data_dir: str | None = None,
        hf_config: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        cache_dir: str | None = None,
    ):
        import datasets

        self.name = spec
        known = None if is_saved_dataset(spec) else known_hub_dataset(spec)
        obj = self._open(spec, data_dir, hf_config, cache_dir)
        dsd: dict[str, Any] = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"train": obj}

        def pick(
            given: str | None,
            known_value: str | None,
            candidates: tuple[str, ...],
            role: str,
            exclude: tuple[str | None, ...] = (),
        ) -> str | None:
            if given is not None:
                if given not in dsd:
                    raise ValueError(
                        f"{spec}: no split {given!r} for {role}; splits: {sorted(dsd)}"
                    )
                return given
            if known_value in dsd:
                return known_value
            return next((c for c in candidates if c in dsd and c not in exclude), None)

        train = pick(train_split, known and known.train_split, ("train",), "train")
        if train is None:
            raise ValueError(f"{spec}: no 'train' split (splits: {sorted(dsd)}); pass train_split")
        features = dsd[train].features
        self.image_column = (
            image_column
            or (known.image_column if known else None)
            or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        )
        self.label_column = (
            label_column
            or (known.label_column if known else None)
            or (
                "label"
                if "label" in features
                else next(
                    (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None
                )
            )
        )
        for role, col in (("image_column", self.image_column), ("label_column", self.label_column)):
            if col is None or col not in features:
                raise ValueError(
                    f"{spec}: cannot find the {role} ({col!r}) among the features "
                    f"{dict(features)}; pass {role}=..."
                )

        test = (
            pick(test_split, known and known.test_split, _TEST_NAMES, "test", exclude=(train,))
            if test_split or known
            else self._labelled_test(dsd, train)
        )
        val = pick(val_split, None, _VAL_NAMES, "val", exclude=(train, test))
        self._splits = {"train": train}
        self._splits.update({k: v for k, v in (("val", val), ("test", test)) if v})
        self._data = {
            role: dsd[name]
            .select_columns([self.image_column])
            .cast_column(self.image_column, datasets.Image(decode=False))
            for role, name in self._splits.items()
        }
        self._labels = {
            role: [int(v) for v in dsd[name][self.label_column]]
            for role, name in self._splits.items()
        }
        self._fingerprint = f"{getattr(dsd[train], '_fingerprint', '')}-{len(dsd[train])}"
        self.classnames = self._classnames(features[self.label_column], known)
        require_classes(
            self.classnames,
            f"the Hugging Face dataset {spec}",
            f"check label_column ({self.label_column!r}) and the dataset",
        )
        self.templates = list(known.templates) if known else list(DEFAULT_TEMPLATES)
        log.info(
            "HF dataset %s: %d classes, splits %s",
            spec,
            len(self.classnames),
            {r: f"{n} ({len(self._labels[r])})" for r, n in self._splits.items()},
        )

    @staticmethod
    def _open(spec: str, data_dir: str | None, hf_config: str | None, cache_dir: str | None) -> Any:
        import datasets

        if is_saved_dataset(spec):
            return datasets.load_from_disk(str(Path(spec).expanduser()))
        try:
            return datasets.load_dataset(spec, hf_config, data_dir=data_dir, cache_dir=cache_dir)
        except Exception as err:
            raise RuntimeError(
                f"could not load the Hugging Face dataset {spec!r}"
                f"{f' (data_dir={data_dir!r})' if data_dir else ''}: {type(err).__name__}: {err}. "
                "Check the hub id (e.g. ILSVRC/imagenet-1k, which needs `hf auth login` "
                "and accepted terms; uoft-cs/cifar10; uoft-cs/cifar100), download it once while "
                "online (then HF_DATASETS_OFFLINE=1 works), or pass a local folder or a saved "
                "dataset"
            ) from err

    def _labelled_test(self, dsd: dict[str, Any], train: str) -> str | None:
        """The first evaluation split whose labels are real (ImageNet's test split is all -1)."""
        for name in _TEST_NAMES:
            if name in dsd and name != train:
                labels = dsd[name][self.label_column]
                if any(int(v) >= 0 for v in labels):
                    return name
                log.info("%s: split %r is unlabelled; not using it for evaluation", self.name, name)
        return None

    def _classnames(self, feature: Any, known: Any) -> list[str]:
        import datasets

        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if known is not None and (names is None or len(names) == len(known.classnames)):
            return list(known.classnames)
        if names is None:
            raise ValueError(
                f"{self.name}: label column {self.label_column!r} is not a ClassLabel, so the "
                "class names are unknown; pass classnames=[...] in label order"
            )
        return [folder_to_classname(n) for n in names]

    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def labels(self, split: str) -> list[int]:
        return self._labels[split]

    def load(self, split: str, index: int) -> Image.Image:
        cell = self._data[split][int(index)][self.image_column]
        data = cell.get("bytes") or cell.get("path")
        if data is None:
            raise ValueError(f"{self.describe(split, index)} has neither bytes nor a path")
        return decode_image(data, self.describe(split, index))

    def describe(self, split: str, index: int) -> str:
        cell = self._data[split][int(index)][self.image_column]
        where = f" ({cell['path']})" if cell.get("path") else ""
        return f"{self.name}[{self._splits[split]}][{index}]{where}"

    def fingerprint(self) -> str:
        return self._fingerprint
