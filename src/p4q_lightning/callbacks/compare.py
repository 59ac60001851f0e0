"""FP / PTQ / P4Q on the same test split: one table, a bar chart and similarity matrices.

``ComparisonCallback`` evaluates, after testing (or fitting), the float zero-shot teacher, the
PTQ student with the template classifier and the trained student (P4Q or CoOp) on the test
loader, then writes ``comparison/{comparison.csv, comparison.json, accuracy.png,
similarity.png}`` in the run directory (:mod:`comparison_files`) and, when a ``WandbLogger``
is attached, logs the same table, a bar chart and the figures to Weights & Biases
(:mod:`comparison_wandb`). This module holds the evaluation. :func:`resolve_wandb_mode` switches
W&B to offline mode when it has no key or no network, so a run never hangs on it.

A run with more test sets (the datamodule's ``test_sets``: domain generalisation,
cross-dataset transfer, base-to-novel's ``new`` half) gets rows for each, named in
``test_set``; a base-to-novel run adds each method's harmonic mean of base and new
(``test_set: hm``, CoCoOp's H).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from p4q_lightning.callbacks.comparison_files import write_outputs
from p4q_lightning.callbacks.comparison_wandb import log_to_wandb
from p4q_lightning.callbacks.export import RunDirectory
from p4q_lightning.export.writer import estimate_lowbit_nbytes, float32_nbytes
from p4q_lightning.methods import METHODS
from p4q_lightning.model.classifier import P4QClassifier
from p4q_lightning.model.lora import lora_disabled, lora_parameters
from p4q_lightning.rundir import bits_label
from p4q_lightning.test_classes import Rows, scoring_classes
from p4q_lightning.wandb_mode import resolve_wandb_mode

log = logging.getLogger(__name__)

FP_METHOD, PTQ_METHOD = "fp32 zero-shot", "ptq"
BASE, NEW, HM = "base", "new", "hm"


def _bits(spec: Any) -> tuple[str, int, int]:
    """(label, weight bits, activation bits) of the dominant layers (the MLP linears)."""
    if spec is None or spec.is_float:
        return bits_label(None), 32, 32
    g = spec["vision.mlp_fc"]
    return bits_label(spec.name), g.w_bits or 32, g.a_bits or 32


def _data_info(trainer: Trainer) -> dict[str, Any]:
    dm = trainer.datamodule
    info: dict[str, Any] = {}
    for key in ("shots", "seed", "dataset", "dataset_name", "subsample_classes"):
        value = getattr(dm, key, None)
        if value is None:
            value = (getattr(dm, "hparams", None) or {}).get(key) if dm is not None else None
        if isinstance(value, (str, int, float, bool)):
            info[key] = value
    return info


class ComparisonCallback(Callback):
    """Compare the float zero-shot teacher, the PTQ student and the trained student.

    Args:
        after: ``test`` (after ``trainer.test``) or ``fit`` (after training, on the test loader).
        max_batches: evaluate at most this many test batches (None: the whole split).
        n_similarity: test images (distinct classes when possible) in the similarity figure.
        dirname: sub-directory of the run directory for the CSV/JSON/PNGs.
        wandb_fallback: call :func:`resolve_wandb_mode` now (offline without key or network).
    """

    def __init__(
        self,
        after: str = "test",
        max_batches: int | None = None,
        n_similarity: int = 8,
        dirname: str = "comparison",
        wandb_fallback: bool = True,
    ) -> None:
        if after not in ("test", "fit"):
            raise ValueError(f"after={after!r}: use 'test' or 'fit'")
        self.after, self.max_batches, self.n_similarity, self.dirname = (
            after,
            max_batches,
            n_similarity,
            dirname,
        )
        self.rows: list[dict[str, Any]] = []
        self.files: dict[str, Path] = {}
        self.similarity: tuple[dict[str, torch.Tensor], list[str]] = ({}, [])
        self.run_directory = RunDirectory()
        if wandb_fallback:
            resolve_wandb_mode()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the run directory on every rank (a collective under DDP), before the
        rank-zero-only comparison needs it."""
        self.run_directory.resolve(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.after == "test":
            self.compare(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.after == "fit":
            self.compare(trainer, pl_module)

    @rank_zero_only
    def compare(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        loaders = self._test_loaders(trainer)
        sets = getattr(trainer.datamodule, "test_sets", None) or [None]
        if len(sets) != len(loaders):
            sets = [None] * len(loaders)
        info = _data_info(trainer)
        own_name = getattr(sets[0], "name", None) or str(info.get("dataset", "test"))
        templates = (getattr(pl_module, "hparams", None) or {}).get("templates")
        was_training = pl_module.training
        pl_module.eval()
        rows: list[dict[str, Any]] = []
        try:
            with torch.no_grad():
                for i, (test_set, loader) in enumerate(zip(sets, loaders, strict=True)):
                    model = pl_module.classifier
                    with scoring_classes(model, test_set, templates) as restrict:
                        set_rows, set_matrices, set_labels = self.evaluate(
                            model, loader, info, restrict, getattr(test_set, "classnames", None)
                        )
                    name = own_name if i == 0 else test_set.name
                    rows += [{"test_set": name, **r} for r in set_rows]
                    if i == 0:
                        matrices, labels = set_matrices, set_labels
        finally:
            pl_module.train(was_training)
        rows += harmonic_mean_rows(rows)
        self.rows, self.similarity = rows, (matrices, labels)
        out = self.run_directory.get(trainer) / self.dirname
        self.files = write_outputs(
            out, rows, matrices, labels, _run_info(pl_module.classifier, trainer)
        )
        self._log(trainer, rows)
        return rows

    @staticmethod
    def _test_loaders(trainer: Trainer) -> list[Any]:
        """Every test loader, the run's own test split first."""
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "test_dataloader"):
            try:
                loaders = dm.test_dataloader()
            except (AttributeError, RuntimeError):  # test split not set up (comparing after fit)
                dm.setup("test")
                loaders = dm.test_dataloader()
        else:
            loaders = trainer.test_dataloaders
        if loaders is None:
            raise RuntimeError(
                "ComparisonCallback needs a test split: use a datamodule with test_dataloader()"
            )
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def evaluate(
        self,
        model: P4QClassifier,
        loader: Any,
        data_info: dict[str, Any],
        restrict: Rows | None = None,
        classnames: Any = None,
    ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], list[str]]:
        """Top-1/top-5 of every method on ``loader`` plus the similarity matrices.

        ``restrict`` takes the classifier's class embeddings to the rows that score this set
        (a domain-generalisation set's classes); ``classnames`` are the set's class names."""
        method = model.method
        quantized, trained = model.traits.quantized, model.traits.fits
        names = list(classnames) if classnames is not None else model.classnames
        text = {FP_METHOD: model.template_text_features(model.teacher)}
        if quantized:
            with _ptq_student(model):
                text[PTQ_METHOD] = model.template_text_features(model.student)
        if trained:
            text[method] = model.student_text_features().detach().float()
        if restrict is not None:
            text = {m: restrict(t) for m, t in text.items()}
        correct = {m: [0, 0] for m in text}
        total = 0
        sel_feats: dict[str, list[torch.Tensor]] = {m: [] for m in text}
        sel_labels: list[int] = []
        k5 = min(5, len(names))
        for i, batch in enumerate(loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            images, labels = batch[0].to(model.device), batch[1].to(model.device)
            feats = {FP_METHOD: model.teacher_image_features(images)}
            with _ptq_student(model):
                student = model.student_image_features(images) if quantized else feats[FP_METHOD]
            if quantized:
                feats[PTQ_METHOD] = student
            scores: dict[str, torch.Tensor] = {}
            if trained:
                if model.traits.image_tower_trains:  # CLIP-LoRA: its own image features
                    student = model.student_image_features(images)
                feats[method] = model.adapt(student)
                # the method's own logits (Tip-Adapter adds its cache to the cosine logits)
                scores[method] = model.logits_from_features(student, text[method])
            pick = self._pick(labels, sel_labels)
            for m, f in feats.items():
                f = F.normalize(f, dim=-1)
                score = scores.get(m)
                top = (f @ text[m].t() if score is None else score).topk(k5, dim=-1).indices
                correct[m][0] += int((top[:, 0] == labels).sum())
                correct[m][1] += int((top == labels[:, None]).any(dim=-1).sum())
                if pick:
                    sel_feats[m].append(f[pick].cpu())
            sel_labels += [int(labels[j]) for j in pick]
            total += int(labels.shape[0])
        if total == 0:
            raise RuntimeError("the test loader yielded no batches; nothing to compare")
        sizes = _sizes(model)
        rows = []
        for m in text:
            label, w_bits, a_bits = _bits(
                None if m == FP_METHOD or not quantized else model.quant_spec
            )
            rows.append(
                {
                    "method": m,
                    "bits": label,
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "shots": data_info.get("shots", 0) if _trains(m) else 0,
                    "top1": correct[m][0] / total,
                    "top5": correct[m][1] / total,
                    "size_mb": sizes[m] / 1e6,
                    "n_test": total,
                }
            )
        matrices = {
            m: torch.cat(sel_feats[m]) @ text[m][sel_labels].cpu().t() for m in text if sel_feats[m]
        }
        return rows, matrices, [names[j] for j in sel_labels]

    def _pick(self, labels: torch.Tensor, chosen: list[int]) -> list[int]:
        """Indices of this batch to add to the similarity figure: unseen classes first."""
        room = self.n_similarity - len(chosen)
        seen, pick = set(chosen), []
        for j, y in enumerate(labels.tolist()):
            if len(pick) >= room:
                break
            if y not in seen:
                pick.append(j)
                seen.add(y)
        return pick

    def _log(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        own = rows[0]["test_set"] if rows else None
        metrics = {
            f"comparison/{_where(r, own)}{r['method']}/{k}": float(r[k])
            for r in rows
            for k in ("top1", "top5")
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                log_to_wandb(logger.experiment, rows, self.files)


def _where(row: dict[str, Any], own: Any) -> str:
    """The metric-name prefix of a row's test set (none for the run's own split)."""
    return "" if row["test_set"] == own else f"{row['test_set']}/"


def _hm(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def harmonic_mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CoCoOp's H for each method that has a ``base`` and a ``new`` row (else none)."""
    by_set = {(r["test_set"], r["method"], r["bits"]): r for r in rows}
    out = []
    for r in rows:
        if r["test_set"] != BASE or (NEW, r["method"], r["bits"]) not in by_set:
            continue
        new = by_set[(NEW, r["method"], r["bits"])]
        out.append(
            {
                **r,
                "test_set": HM,
                "top1": _hm(r["top1"], new["top1"]),
                "top5": _hm(r["top5"], new["top5"]),
                "n_test": r["n_test"] + new["n_test"],
            }
        )
    return out


def _trains(row_method: str) -> bool:
    """Whether a comparison row's method used the shots (rows also name ``fp32 zero-shot``)."""
    return row_method in METHODS and METHODS[row_method].fits


def _ptq_student(model: P4QClassifier) -> AbstractContextManager[None]:
    """The PTQ student as it was before training: CLIP-LoRA's factors switched off."""
    return lora_disabled(model.student) if model.traits.lora else nullcontext()


def _sizes(model: P4QClassifier) -> dict[str, float]:
    fp = float32_nbytes(model.teacher)
    sizes = {FP_METHOD: fp, "coop": fp}
    if model.traits.quantized:
        # float extras beside the low-bit student: LoRA factors, Tip-Adapter's keys and values
        lora_bytes = sum(p.numel() * 4 for p in lora_parameters(model.student))
        sizes[PTQ_METHOD] = estimate_lowbit_nbytes(model.student) - lora_bytes
        extras = lora_bytes
        if model.tip_cache is not None:
            extras += (model.tip_cache.keys.numel() + model.tip_cache.values.numel()) * 4
        sizes[model.method] = (
            sizes[PTQ_METHOD]
            + extras
            + (estimate_lowbit_nbytes(model.adapter) if model.adapter is not None else 0)
        )
    learner = model.prompt_learner
    if learner is not None:
        for m in list(sizes):
            if _trains(m):
                sizes[m] += learner.ctx.numel() * 4
    return sizes


def _run_info(model: P4QClassifier, trainer: Trainer) -> dict[str, Any]:
    return {
        "model": model.model_name,
        "pretrained": model.pretrained,
        "method": model.method,
        "quant": model.quant_spec.name,
        "classes": len(model.classnames),
        **_data_info(trainer),
    }
