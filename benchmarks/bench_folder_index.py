"""Start time of a large ImageNet-layout folder: first start (listed) vs second (indexed).

    python benchmarks/bench_folder_index.py [--classes 1000] [--per-class 100] [--rounds 3]

Generates ``$DATA/imagenet/`` in CoOp's layout (``images/train/<wnid>/`` with ``--per-class``
empty files per class, ``images/val/<wnid>/`` with 5, ``classnames.txt``) in a temporary
folder, then times a start of ``FewShotDataModule(dataset="imagenet", root=$DATA)`` until its
few-shot split is known (opening the dataset and drawing or reading the 16-shot split; no
image is decoded). The first start lists every folder and writes the JSON index and the split
file; the second reads both. Each round deletes the index and split files first; the table
gives the median of the rounds. The files stay in the page cache, so listing is as fast as
it gets here; on network storage the first start is slower and the ratio larger.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from p4q_lightning.data import FewShotDataModule


def make_tree(root: Path, classes: int, per_class: int, val_per_class: int = 5) -> int:
    """Write the layout; returns the number of files."""
    base = root / "imagenet"
    wnids = [f"n{i:08d}" for i in range(classes)]
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    for split, n in (("train", per_class), ("val", val_per_class)):
        for wnid in wnids:
            folder = base / "images" / split / wnid
            folder.mkdir(parents=True)
            for j in range(n):
                (folder / f"{wnid}_{j}.JPEG").touch()
    return classes * (per_class + val_per_class)


def start(root: Path, cache: Path, per_class: int) -> tuple[float, int]:
    """Seconds until the few-shot split is known; the number of train items."""
    begin = time.perf_counter()
    dm = FewShotDataModule("imagenet", root=str(root), shots=16, split_dir=str(cache))
    dm.prepare_data()
    split = dm.run_split.load(write=True)
    seconds = time.perf_counter() - begin
    assert len(split["train"]) == min(16, per_class) * len(dm.source.classnames)
    return seconds, len(dm.source.labels("train"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "DATA", Path(tmp) / "cache"
        t0 = time.perf_counter()
        files = make_tree(root, args.classes, args.per_class)
        made = time.perf_counter() - t0
        firsts, seconds = [], []
        for _ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            first, n_train = start(root, cache, args.per_class)
            second, n_again = start(root, cache, args.per_class)
            assert n_train == n_again == args.classes * args.per_class
            firsts.append(first)
            seconds.append(second)
    first, second = statistics.median(firsts), statistics.median(seconds)
    sys.stdout.write(
        f"ImageNet layout: {args.classes} classes, {files:,} files (written in {made:.1f} s); "
        f"median of {args.rounds} rounds\n\n"
        "| start | seconds |\n|---|---:|\n"
        f"| first (list folders, draw split, write index + split) | {first:.3f} |\n"
        f"| second (stat folders, read index + split) | {second:.3f} |\n"
        f"| ratio first / second | {first / second:.1f}x |\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
