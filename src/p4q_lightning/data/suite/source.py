"""``SuiteSource``: one of CoOp's 15 datasets read from its folder under ``$DATA``."""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from p4q_lightning.data.listing import PathChunks
from p4q_lightning.data.sources import ImageSource, decode_image
from p4q_lightning.data.suite.catalog import SuiteDataset
from p4q_lightning.data.suite.readers import SuiteLayoutError, read_items

log = logging.getLogger(__name__)


class SuiteSource(ImageSource):
    """A suite dataset: items keyed by their path relative to the dataset folder (as CoOp's
    split files record them), CoOp's class names and its hand-written template.

    Few-shot splits of a suite source follow CoOp's draw exactly (``draw_rule = "coop"``, see
    :func:`~p4q_lightning.data.fewshot.coop_draw`). The test-only datasets (ImageNetV2, -Sketch,
    -A, -R) have only a ``test`` split.

    Args:
        spec: the dataset (see :mod:`p4q_lightning.data.suite.catalog`).
        root: ``$DATA``, the folder holding every dataset folder.
        index_dir: where folder listings are indexed (None: list every time).
    """

    draw_rule = "coop"

    def __init__(self, spec: SuiteDataset, root: str | os.PathLike[str], index_dir: Path | None):
        root = Path(root).expanduser()
        folder = root / spec.folder
        if not folder.is_dir():
            where = f"root {root}" if root.is_dir() else f"root {root}, which does not exist"
            raise SuiteLayoutError(
                f"{spec.name}: no folder {folder}: expected {spec.folder}/ under {where}, holding "
                f"{spec.image_dir + '/ and ' if spec.image_dir else ''}"
                f"{', '.join(spec.needed_files)} (CoOp's DATASETS.md layout)"
            )
        self.spec, self.folder = spec, folder
        items = read_items(spec, folder, index_dir)
        self.name = spec.name
        self.classnames = items.classnames
        self.class_ids = items.class_ids  # wnids of the ImageNet family, else None
        self.templates = [spec.template]
        self._items = items.splits
        self._fingerprint: str | None = None
        log.info(
            "%s (%s): %d classes, splits %s",
            spec.name,
            folder,
            len(self.classnames),
            {s: len(v[0]) for s, v in self._items.items()},
        )

    @property
    def test_only(self) -> bool:
        return self.spec.test_only

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in ("train", "val", "test") if s in self._items)

    def labels(self, split: str) -> list[int]:
        return self._split(split)[1]

    def keys(self, split: str) -> list[str]:
        paths = self._split(split)[0]
        if isinstance(paths, PathChunks):
            return paths.as_list()
        return paths  # type: ignore[return-value]  # the reader's list (nobody mutates keys)

    def _split(self, split: str) -> tuple[Sequence[str], list[int]]:
        if split not in self._items:
            if split == "train" and self.test_only:
                raise ValueError(test_only_message(self.spec))
            raise KeyError(f"{self.name} has no {split!r} split (splits: {self.splits()})")
        return self._items[split]

    def load(self, split: str, index: int) -> Image.Image:
        path = self.folder / self._split(split)[0][index]
        return decode_image(path, str(path))

    def describe(self, split: str, index: int) -> str:
        return str(self.folder / self._split(split)[0][index])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            paths, labels = self._items["test" if self.test_only else "train"]
            text = paths.digest() if isinstance(paths, PathChunks) else "\n".join(paths)
            digest = hashlib.sha1(text.encode())
            digest.update(array("q", labels).tobytes())
            self._fingerprint = f"{len(paths)}-{digest.hexdigest()[:16]}"
        return self._fingerprint

    @property
    def split_key(self) -> str:
        return os.path.abspath(self.folder)


def test_only_message(spec: SuiteDataset) -> str:
    return (
        f"{spec.name} is a test-only dataset (domain generalisation): it has no training "
        f"images; train on {spec.domain_of} and list {spec.name} in data.test_datasets"
    )
