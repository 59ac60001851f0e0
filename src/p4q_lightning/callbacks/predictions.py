"""``PredictionWriter``: what ``lightning predict`` writes: one CSV row per image with its
top-5 classes and their probabilities, in the run directory."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from p4q_lightning.callbacks.export import run_dir

TOP_K = 5


def image_id(dataset: Any, index: int) -> str:
    """A stable name for a dataset item: its file path when the dataset has one, else its index
    in the source split, else its position."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return str(samples[index][0])
    indices, split = getattr(dataset, "indices", None), getattr(dataset, "split", None)
    if indices is not None and isinstance(split, str):
        return f"{split}/{indices[index]}"
    return str(index)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (``image, target, pred_1..pred_k, score_1..score_k``).

    Args:
        filename: file name in the run directory (``predictions-rank<r>.csv`` on other ranks).
        top_k: how many classes per image (at most the number of classes).
    """

    def __init__(self, filename: str = "predictions.csv", top_k: int = TOP_K) -> None:
        super().__init__(write_interval="batch")
        self.filename, self.top_k = filename, top_k
        self.path: Path | None = None
        self._writer: Any = None
        self._file: Any = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = self.filename
        if trainer.global_rank:
            name = f"{Path(name).stem}-rank{trainer.global_rank}{Path(name).suffix}"
        self.path = run_dir(trainer) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        k = min(self.top_k, len(pl_module.classifier.classnames))
        self._file = self.path.open("w", newline="")
        self._writer = csv.writer(self._file)
        header = ["image", "target"]
        header += [f"pred_{i}" for i in range(1, k + 1)] + [f"score_{i}" for i in range(1, k + 1)]
        self._writer.writerow(header)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        names = pl_module.classifier.classnames
        k = min(self.top_k, len(names))
        probs = torch.softmax(prediction["logits"].float(), dim=-1)
        scores, top = probs.topk(k, dim=-1)
        targets = batch[1].tolist() if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        loader = trainer.predict_dataloaders
        loader = loader[dataloader_idx] if isinstance(loader, (list, tuple)) else loader
        dataset = getattr(loader, "dataset", None)
        for row in range(top.shape[0]):
            index = batch_indices[row] if batch_indices is not None else row
            target = names[targets[row]] if targets is not None else ""
            self._writer.writerow(
                [image_id(dataset, index), target]
                + [names[j] for j in top[row].tolist()]
                + [f"{s:.6f}" for s in scores[row].tolist()]
            )

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
