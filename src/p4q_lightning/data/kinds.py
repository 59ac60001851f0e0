"""Which kind of dataset a ``dataset`` string names, and opening it as an image source.

The datamodule takes one string (plus ``root`` for the suite); the kinds below are asked in
order and the first that claims the string opens it:

1. ``synthetic[:<world seed>]``: the generated demo world;
2. a CoOp suite name (``oxford_pets``, ``OxfordPets``...): its folder under ``root``;
3. a folder written by ``datasets``' ``save_to_disk``;
4. an existing local image folder;
5. anything else: a Hugging Face hub id (``uoft-cs/cifar10``) or builder, unless it looks
   like a local path, which is then reported missing.

:func:`register_kind` adds a kind ahead of the hub fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p4q_lightning.data.hub import HubArgs, HubSource, is_saved_dataset
from p4q_lightning.data.sources import FolderSource, ImageSource, SyntheticArgs, SyntheticSource
from p4q_lightning.data.suite.catalog import suite_dataset, suite_names
from p4q_lightning.synthetic_name import is_synthetic, synthetic_world_seed


@dataclass(frozen=True)
class DatasetRequest:
    """What the datamodule knows when it opens a dataset.

    Args:
        dataset: the string the user gave.
        root: ``$DATA`` for the suite's names (None: not given).
        hub: Hugging Face options.
        synthetic: the demo world's options.
        index_dir: where large folder listings are indexed.
    """

    dataset: str
    root: str | None = None
    hub: HubArgs = HubArgs()
    synthetic: SyntheticArgs = SyntheticArgs()
    index_dir: Path | None = None

    @property
    def path(self) -> str:
        return os.path.expanduser(self.dataset)


@dataclass(frozen=True)
class ImageDefaults:
    """Preprocessing a kind of dataset gets when the datamodule's options leave it unset."""

    image_size: int = 224  # CLIP's input size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's default


@dataclass(frozen=True)
class DatasetKind:
    """A kind of dataset: ``claims`` recognises its strings, ``open`` builds the source,
    ``defaults`` is its preprocessing when the options leave it unset."""

    name: str
    claims: Callable[[DatasetRequest], bool]
    open: Callable[[DatasetRequest], ImageSource]
    defaults: ImageDefaults = ImageDefaults()


# the demo world renders 32-pixel images of one object, which a crop below half would lose
SYNTHETIC_DEFAULTS = ImageDefaults(image_size=32, crop_scale=(0.5, 1.0))


def _open_synthetic(request: DatasetRequest) -> ImageSource:
    world = request.synthetic
    seed = synthetic_world_seed(request.dataset, world.world_seed)
    assert seed is not None
    return SyntheticSource(seed, world.train_per_class, world.test_per_class)


def _claims_suite(request: DatasetRequest) -> bool:
    # without root, an existing local folder of that name keeps meaning that folder
    return suite_dataset(request.dataset) is not None and (
        request.root is not None or not os.path.exists(request.path)
    )


def _open_suite(request: DatasetRequest) -> ImageSource:
    from p4q_lightning.data.suite.source import SuiteSource

    spec = suite_dataset(request.dataset)
    assert spec is not None
    if request.root is None:
        raise ValueError(
            f"dataset {request.dataset!r} is CoOp's {spec.coop_name}: pass the folder holding "
            f"{spec.folder}/ as data.init_args.root (e.g. --data.init_args.root $DATA)"
        )
    return SuiteSource(spec, request.root, request.index_dir)


def hub_source(request: DatasetRequest) -> HubSource:
    """The Hugging Face source of ``request`` with its ``hub`` options."""
    return HubSource.from_args(request.dataset, request.hub)


def _open_hub_or_report_missing(request: DatasetRequest) -> ImageSource:
    """A hub id is "name" or "owner/name"; anything else that does not exist is a bad path."""
    d, path = request.dataset, request.path
    owner = d.split("/", 1)[0] if d.count("/") == 1 else ""
    if (
        d.startswith((".", "/", "~"))
        or d.count("/") > 1
        or "\\" in d
        or (owner and os.path.isdir(owner))  # data/missing: a folder under ./data
    ):
        raise FileNotFoundError(
            f"dataset folder {os.path.abspath(path)} does not exist; pass an existing image "
            "folder, a saved dataset, a hub id such as uoft-cs/cifar10, a suite name with root "
            f"({', '.join(suite_names()[:3])}, ...) or 'synthetic'"
        )
    try:
        return hub_source(request)
    except RuntimeError as err:
        if not owner:
            raise
        raise FileNotFoundError(
            f"dataset {d!r} is neither a local folder ({os.path.abspath(path)} does not "
            f"exist) nor a loadable hub dataset ({err})"
        ) from err


KINDS: list[DatasetKind] = [
    DatasetKind(
        "synthetic", lambda r: is_synthetic(r.dataset), _open_synthetic, SYNTHETIC_DEFAULTS
    ),
    DatasetKind("suite", _claims_suite, _open_suite),
    DatasetKind("saved", lambda r: is_saved_dataset(r.path), hub_source),
    DatasetKind("folder", lambda r: os.path.exists(r.path), lambda r: FolderSource(r.path)),
    DatasetKind("hub", lambda r: True, _open_hub_or_report_missing),
]


def register_kind(kind: DatasetKind) -> None:
    """Add a kind of dataset, asked before the local-folder and hub fallbacks."""
    KINDS.insert(len(KINDS) - 2, kind)


def dataset_kind(request: DatasetRequest) -> DatasetKind:
    """The first kind that claims ``request``."""
    return next(k for k in KINDS if k.claims(request))


def open_source(request: DatasetRequest) -> ImageSource:
    """Open the dataset ``request`` names (see the module docstring for the order)."""
    return dataset_kind(request).open(request)
