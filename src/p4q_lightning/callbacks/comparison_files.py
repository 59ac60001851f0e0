"""The comparison's files: ``comparison.csv``, ``comparison.json`` and its figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from p4q_lightning.files import atomic_write, write_csv

log = logging.getLogger(__name__)

COLUMNS = [
    "method",
    "bits",
    "w_bits",
    "a_bits",
    "shots",
    "top1",
    "top5",
    "size_mb",
    "n_test",
    "test_set",
]


def write_outputs(
    directory: Path,
    rows: list[dict[str, Any]],
    matrices: dict[str, torch.Tensor],
    labels: list[str],
    run: dict[str, Any],
) -> dict[str, Path]:
    """The comparison as CSV, JSON and PNGs in ``directory``; returns their paths."""
    from p4q_lightning.plots import accuracy_bars, similarity_matrices

    directory.mkdir(parents=True, exist_ok=True)
    files = {"csv": directory / "comparison.csv", "json": directory / "comparison.json"}
    write_csv(files["csv"], rows, COLUMNS)
    payload = {
        "run": run,
        "rows": rows,
        "similarity": {"labels": labels, **{m: v.tolist() for m, v in matrices.items()}},
    }
    with atomic_write(files["json"]) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    title = f"{run.get('model')} · {run.get('quant')}"
    several = len({r.get("test_set") for r in rows}) > 1
    bars = [{**r, "bits": f"{r['bits']}\n{r['test_set']}"} for r in rows] if several else rows
    files["accuracy"] = accuracy_bars(bars, directory / "accuracy.png", title)
    if matrices:
        files["similarity"] = similarity_matrices(
            {m: v.numpy() for m, v in matrices.items()},
            labels,
            directory / "similarity.png",
            "image-text cosine similarity",
        )
    log.info("comparison written to %s", directory)
    return files
