"""One run's dataset and few-shot split: the opened source (all classes, or CoCoOp's base or new
half), the split file for (shots, seed) and the items each stage uses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from p4q_lightning.data.fewshot import (
    make_split,
    read_split,
    resolve_indices,
    split_path,
    write_split,
)
from p4q_lightning.data.kinds import DatasetRequest, open_source
from p4q_lightning.data.sources import ImageSource
from p4q_lightning.data.subsample import ClassSubset, subsample_labels
from p4q_lightning.data.suite.source import test_only_message

log = logging.getLogger(__name__)


class RunSplit:
    """The dataset of one run, opened on first use.

    The few-shot split is drawn on every class (so ``all``, ``base`` and ``new`` runs share one
    split file, as in CoCoOp); ``source`` is then the half the run keeps, relabelled.

    Args:
        request: the dataset to open (see :mod:`p4q_lightning.data.kinds`).
        shots: training images per class.
        seed: seed of the few-shot draw.
        subsample: ``all``, ``base`` or ``new``.
        split_dir: where split files go.
    """

    def __init__(
        self, request: DatasetRequest, shots: int, seed: int, subsample: str, split_dir: Path
    ) -> None:
        self.request, self.shots, self.seed = request, shots, seed
        self.subsample, self.split_dir = subsample, split_dir
        self._full: ImageSource | None = None
        self._source: ImageSource | None = None
        self._split: dict[str, Any] | None = None

    @property
    def full(self) -> ImageSource:
        """The dataset with all its classes."""
        if self._full is None:
            self._full = open_source(self.request)
        return self._full

    @property
    def test_only(self) -> bool:
        """A dataset without training images (ImageNetV2, -Sketch, -A, -R)."""
        return bool(getattr(self.full, "test_only", False))

    def refuse_test_only(self) -> None:
        raise ValueError(test_only_message(self.full.spec))  # type: ignore[attr-defined]

    @property
    def path(self) -> Path:
        """The JSON split file for (dataset, shots, seed)."""
        return split_path(self.split_dir, self.full.split_key, self.shots, self.seed)

    def write(self) -> None:
        """Draw and write the split file unless it exists (``prepare_data``, once per node)."""
        if self.test_only:
            return  # nothing to draw; training on it is refused at setup
        if not self.path.is_file():
            write_split(self.path, make_split(self.full, self.shots, self.seed))
            log.info("wrote few-shot split %s", self.path)

    @property
    def loaded(self) -> bool:
        return self._split is not None

    def load(self, write: bool) -> dict[str, Any]:
        """The split, read from its file or drawn (the same on every rank; ``write``: also
        write the file, on the first rank only)."""
        if self._split is None:
            if self.test_only:
                self.refuse_test_only()
            if self.path.is_file():
                self._split = read_split(self.path, self.full, self.shots, self.seed)
            else:
                self._split = make_split(self.full, self.shots, self.seed)
                if write:
                    write_split(self.path, self._split)
        return self._split

    def source(self, write: bool) -> ImageSource:
        """The classes the run uses: all of them, or CoCoOp's base or new half."""
        if self._source is None:
            if self.subsample == "all":
                self._source = self.full
            else:
                split, full = self.load(write), self.full
                labels = full.labels("train")
                drawn = resolve_indices(full, "train", split["train"])
                keep = subsample_labels([labels[i] for i in drawn], self.subsample)
                self._source = ClassSubset(full, keep, self.subsample)
        return self._source

    def drawn(self, name: str) -> list[Any]:
        """The split's ``train``/``val`` keys of the run's classes."""
        assert self._split is not None and self._source is not None
        keys = self._split[name]
        if self._source is self.full:
            return keys
        split = "train" if name == "train" else self._split["val_from"]
        kept = set(self._source.keys(split))
        return [k for k in keys if k in kept]

    def test_items(self) -> tuple[str, list[int]]:
        """The evaluation split and its items: the test split, else the train items outside
        the few-shot split."""
        assert self._source is not None
        source = self._source
        if "test" in source.splits():
            return "test", list(range(len(source.labels("test"))))
        assert self._split is not None
        used = set(resolve_indices(source, "train", self.drawn("train")))
        if self._split["val_from"] == "train":
            used |= set(resolve_indices(source, "train", self.drawn("val")))
        log.info(
            "%s has no test split: testing on the %d train items outside the few-shot split",
            source.name,
            len(source.labels("train")) - len(used),
        )
        return "train", [i for i in range(len(source.labels("train"))) if i not in used]
