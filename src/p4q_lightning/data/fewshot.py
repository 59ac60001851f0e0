"""The CoOp few-shot protocol: seeded per-class sampling and the reusable JSON split file.

CoOp draws ``random.sample(items, k)`` per class (all items, with a warning, when a class has
fewer), validation ``min(k, 4)`` per class, and caches the choice per (k, seed). The split
file stores item ids, so every DDP rank and every rerun trains on the same images.

Sources with ``draw_rule = "coop"`` (the suite's datasets) get CoOp's draw to the image
(:func:`coop_draw`); the others keep this package's class-ordered draw, so their existing
split files and results stay valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p4q_lightning.data.sources import ImageSource
from p4q_lightning.files import atomic_write

log = logging.getLogger(__name__)

SPLIT_FORMAT = 1


def sample_per_class(
    labels: Sequence[int],
    k: int,
    rng: random.Random,
    num_classes: int,
    exclude: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[int], dict[int, int]]:
    """Indices of ``k`` items per class (class order, CoOp's ``random.sample``).

    Returns the chosen indices and ``{class: available}`` for classes with fewer than ``k``
    items, which contribute all they have.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        if i not in exclude:
            by_class[int(y)].append(i)
    chosen: list[int] = []
    short: dict[int, int] = {}
    for c in range(num_classes):
        items = by_class.get(c, [])
        if len(items) <= k:
            if len(items) < k:
                short[c] = len(items)
            chosen.extend(items)
        else:
            chosen.extend(sorted(rng.sample(items, k)))
    return chosen, short


def coop_draw(labels: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """Indices CoOp's ``generate_fewshot_dataset`` picks from a list with these ``labels``.

    Items are grouped by label in the order each label first appears; each group with at
    least ``k`` items gives ``rng.sample(group, k)`` (in draw order; a group of exactly ``k``
    items still calls ``sample``, which advances ``rng``), a smaller group gives all its items.
    """
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    chosen: list[int] = []
    for items in groups.values():
        chosen.extend(rng.sample(items, k) if len(items) >= k else items)
    return chosen


def _short_classes(labels: Sequence[int], k: int, num_classes: int) -> dict[int, int]:
    counts = [0] * num_classes
    for y in labels:
        counts[int(y)] += 1
    return {c: n for c, n in enumerate(counts) if n < k}


def _warn_short(short: dict[int, int], k: int, classnames: Sequence[str], what: str) -> None:
    if not short:
        return
    listed = ", ".join(f"{classnames[c]!r} ({n})" for c, n in list(short.items())[:5])
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    log.warning(
        "%d classes have fewer than %d %s images; taking all of them (as CoOp does): %s%s",
        len(short),
        k,
        what,
        listed,
        more,
    )
    empty = [classnames[c] for c, n in short.items() if n == 0]
    if empty and what == "training":
        raise ValueError(f"classes without any training image: {empty[:5]}; check the dataset")


def make_split(source: ImageSource, shots: int, seed: int) -> dict[str, Any]:
    """Choose the few-shot train and validation items of ``source`` for (shots, seed)."""
    if shots < 1:
        raise ValueError(f"shots={shots}: use a positive number of images per class (CoOp: 1-16)")
    num_classes = len(source.classnames)
    # one generator seeded once, train drawn before val: CoOp's order
    rng = random.Random(seed)
    train_labels = source.labels("train")
    coop = getattr(source, "draw_rule", None) == "coop"
    if coop:
        train = coop_draw(train_labels, shots, rng)
        short = _short_classes(train_labels, shots, num_classes)
    else:
        train, short = sample_per_class(train_labels, shots, rng, num_classes)
    _warn_short(short, shots, source.classnames, "training")
    val_shots = min(shots, 4)
    if "val" in source.splits() and coop:
        val_from = "val"
        val_labels = source.labels("val")
        val = coop_draw(val_labels, val_shots, rng)
        short_val = _short_classes(val_labels, val_shots, num_classes)
    elif "val" in source.splits():
        val_from = "val"
        val, short_val = sample_per_class(source.labels("val"), val_shots, rng, num_classes)
    else:
        val_from = "train"
        val, short_val = sample_per_class(train_labels, val_shots, rng, num_classes, set(train))
        if short_val and "test" in source.splits():
            # The shots used up the train split (e.g. all 500 CIFAR images per class): validate
            # on the evaluation split, as CoOp does for ImageNet.
            log.info("too few train images left for validation; drawing it from the test split")
            val_from = "test"
            val, short_val = sample_per_class(source.labels("test"), val_shots, rng, num_classes)
    _warn_short(short_val, val_shots, source.classnames, "validation")
    train_keys, val_keys = source.keys("train"), source.keys(val_from)
    return {
        "format": SPLIT_FORMAT,
        "dataset": source.name,
        "shots": shots,
        "seed": seed,
        "num_classes": num_classes,
        "classnames_sha1": _sha1("\n".join(source.classnames)),
        "fingerprint": source.fingerprint(),
        "draw": "coop" if coop else "per_class",
        "val_from": val_from,
        "train": [train_keys[i] for i in train],
        "val": [val_keys[i] for i in val],
    }


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def split_path(split_dir: str | os.PathLike[str], dataset: str, shots: int, seed: int) -> Path:
    """``<split_dir>/<dataset-slug>-<hash>_<shots>shot_seed<seed>.json``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(dataset).name or dataset).strip("-")[:40] or "data"
    return Path(split_dir).expanduser() / f"{slug}-{_sha1(dataset)[:8]}_{shots}shot_seed{seed}.json"


def write_split(path: Path, split: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a reader never sees a half-written split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(split))


def read_split(path: Path, source: ImageSource, shots: int, seed: int) -> dict[str, Any]:
    """Read a split file and check it belongs to this dataset, shots and seed."""
    try:
        split = json.loads(path.read_text())
        if not isinstance(split, dict):
            raise ValueError(f"a JSON {type(split).__name__}, not an object")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"split file {path} is damaged ({err}; cut short or edited?): delete it and the "
            "split is drawn again (the same seed draws the same images)"
        ) from err
    expected = {
        "format": SPLIT_FORMAT,
        "shots": shots,
        "seed": seed,
        "num_classes": len(source.classnames),
        "classnames_sha1": _sha1("\n".join(source.classnames)),
        "fingerprint": source.fingerprint(),
    }
    wrong = {k: (split.get(k), v) for k, v in expected.items() if split.get(k) != v}
    if wrong:
        diff = ", ".join(f"{k}: file {a!r} vs {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(
            f"split file {path} does not match the dataset ({diff}). "
            "The dataset changed since it was written: delete the file or set split_dir elsewhere"
        )
    return split


def resolve_indices(source: ImageSource, split_name: str, keys: Sequence[Any]) -> list[int]:
    """Map stored item ids back to indices of ``split_name``."""
    index = {k: i for i, k in enumerate(source.keys(split_name))}
    missing = [k for k in keys if k not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} items of the split file are gone from {source.name} "
            f"({missing[:3]}); delete the split file to resample"
        )
    return [index[k] for k in keys]
