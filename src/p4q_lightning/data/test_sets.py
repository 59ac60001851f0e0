"""The test sets of one run: its own test split, the ``new`` half of a base-to-novel run, and the
domain-generalisation or cross-dataset sets listed in ``test_datasets``.

Each :class:`EvalSet` says how the trained classifier scores it:

- its own split: the classifier as trained;
- a domain-generalisation set (ImageNetV2, -Sketch, -A, -R): the training classifier restricted
  to the set's classes (``class_index``: rows of the training class list; the 200-class -A/-R
  are scored among their 200 classes, not the 1,000), which must all be training classes;
- a cross-dataset set or the ``new`` half: the learned prompt with the set's own class names
  and template (``retarget``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from p4q_lightning.data.fewshot import resolve_indices
from p4q_lightning.data.kinds import DatasetRequest, open_source
from p4q_lightning.data.sources import ImageSource
from p4q_lightning.data.subsample import ClassSubset, subsample_labels
from p4q_lightning.data.suite.catalog import suite_dataset


class RunData(Protocol):
    """What the test sets read from the run's datamodule (``RunData``)."""

    hparams: Any
    dataset: str | None
    classnames: list[str]
    templates: list[str]
    split: dict[str, Any] | None

    @property
    def source(self) -> ImageSource: ...

    @property
    def full_source(self) -> ImageSource: ...

    def request(self, dataset: str) -> DatasetRequest: ...


@dataclass(frozen=True)
class EvalSet:
    """How one test set is scored.

    Args:
        name: what its metrics are called (``test/<name>/top1``) and its comparison rows say.
        classnames: its class names, by its labels.
        templates: its prompt templates.
        class_index: rows of the training classifier that score it (restricted), else None.
        retarget: score it with the learned prompt re-targeted to its own class names.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    class_index: tuple[int, ...] | None = None
    retarget: bool = False


def own_test_set(dm: RunData) -> EvalSet:
    """The run's own test split: ``base``/``new`` for a base-to-novel run, else the dataset."""
    which = dm.hparams.subsample_classes
    name = which if which != "all" else _display_name(str(dm.dataset))
    return EvalSet(name, tuple(dm.classnames), tuple(dm.templates))


def _display_name(dataset: str) -> str:
    spec = suite_dataset(dataset)
    return spec.name if spec else dataset


def _set_name(entry: str) -> str:
    """A metric-safe name of a ``test_datasets`` entry: the suite name, else the last part of
    the id or path (``uoft-cs/cifar10`` -> ``cifar10``)."""
    spec = suite_dataset(entry)
    return spec.name if spec else entry.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def extra_test_sets(
    dm: RunData, subsample: str, entries: Sequence[str]
) -> list[tuple[EvalSet, ImageSource]]:
    """The ``new`` half of a base run, then each ``test_datasets`` entry, opened and checked;
    each with the source whose ``test`` split it evaluates."""
    out: list[tuple[EvalSet, ImageSource]] = []
    if subsample == "base":
        new = _new_half(dm)
        out.append((EvalSet("new", tuple(new.classnames), tuple(new.templates), None, True), new))
    names = [_set_name(e) for e in entries]
    taken = {own_test_set(dm).name, *(t.name for t, _ in out)}
    twice = sorted({n for n in names if names.count(n) > 1 or n in taken})
    if twice:
        raise ValueError(
            f"test_datasets names {', '.join(twice)} twice (or as the run's own test set); "
            "list each test set once"
        )
    for entry, name in zip(entries, names, strict=True):
        source = open_source(dm.request(entry))
        if "test" not in source.splits():
            raise ValueError(
                f"test_datasets entry {entry!r}: {source.name} has no test split to evaluate"
            )
        spec = getattr(source, "spec", None)
        domain = getattr(spec, "domain_of", None)
        templates = tuple(source.templates)
        if domain is not None:
            index = restricted_index(dm, source, name, domain)
            out.append((EvalSet(name, tuple(source.classnames), templates, index), source))
        else:
            out.append((EvalSet(name, tuple(source.classnames), templates, None, True), source))
    return out


def _new_half(dm: RunData) -> ImageSource:
    """CoCoOp's new classes, every item of their test split (or, without one, of their train
    split: a base run never sees a new class's image)."""
    full = dm.full_source
    assert dm.split is not None
    labels = full.labels("train")
    drawn = resolve_indices(full, "train", dm.split["train"])
    new = ClassSubset(full, subsample_labels([labels[i] for i in drawn], "new"), "new")
    return new if "test" in new.splits() else _TrainAsTest(new)


def restricted_index(dm: RunData, source: ImageSource, name: str, domain: str) -> tuple[int, ...]:
    """Rows of the training classes that are ``source``'s classes (by wnid when both sides
    know them, else by name); every one must be a training class."""
    train_ids = getattr(dm.source, "class_ids", None)
    ids = getattr(source, "class_ids", None)
    if train_ids and ids:
        train_keys, keys = list(train_ids), list(ids)
    else:
        train_keys, keys = list(dm.classnames), list(source.classnames)
    row: dict[Any, int] = {}
    for i, k in enumerate(train_keys):
        row.setdefault(k, i)
    missing = [source.classnames[j] for j, k in enumerate(keys) if k not in row]
    if missing:
        raise ValueError(
            f"test_datasets: {name} is a domain-generalisation set of {domain}, but "
            f"{len(missing)} of its {len(keys)} classes are not training classes of "
            f"{dm.dataset} (e.g. {', '.join(repr(m) for m in missing[:3])}); train on {domain} "
            f"to test on {name}"
        )
    return tuple(row[k] for k in keys)


class _TrainAsTest(ImageSource):
    """A source whose ``train`` items are served as its ``test`` split."""

    def __init__(self, source: ImageSource):
        self.source = source
        self.name, self.classnames, self.templates = (
            source.name,
            source.classnames,
            source.templates,
        )

    def splits(self) -> tuple[str, ...]:
        return ("test",)

    def labels(self, split: str) -> list[int]:
        return self.source.labels("train")

    def load(self, split: str, index: int) -> Any:
        return self.source.load("train", index)

    def describe(self, split: str, index: int) -> str:
        return self.source.describe("train", index)
