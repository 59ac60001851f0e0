"""``P4QModule``: P4Q and its baselines (CoOp, PTQ, zero-shot, Tip-Adapter(-F), CLIP-LoRA,
KgCoOp) as one LightningModule.

Thin glue: the float teacher and the quantized student are frozen open_clip models; the prompt
learner and the low-bit adapter are the only trainable parameters. Text towers, losses, feature
caching, checkpoint filtering and optimisers live in their own modules.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torchmetrics.classification import MulticlassAccuracy

from p4q_lightning.args import (
    GROUPS,
    AdapterArgs,
    FeatureArgs,
    LoRAArgs,
    LossArgs,
    OptimArgs,
    PromptArgs,
    TipArgs,
    as_group,
)
from p4q_lightning.losses import cosine_logits, kgcoop_loss, p4q_loss
from p4q_lightning.methods import Method, MethodTraits, traits
from p4q_lightning.model.classifier import DEFAULT_TEMPLATES, P4QClassifier
from p4q_lightning.model.tip_adapter import grid, search_alpha_beta
from p4q_lightning.test_classes import check_scorable, scoring_classes
from p4q_lightning.training import checkpointing, optim
from p4q_lightning.training.feature_source import TrainFeatureSource
from p4q_lightning.training.residency import FrozenOffload

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TEMPLATES", "P4QModule"]


class P4QModule(LightningModule):
    """P4Q on an open_clip CLIP, or one of its baselines, selected by ``method``.

    The model is a :class:`~p4q_lightning.model.classifier.P4QClassifier` (``self.classifier``:
    frozen towers, prompt, adapter, features, logits, calibration); this class is the Lightning
    glue (setup, steps, metrics, optimisers, checkpoints). Options come in groups, nested in
    YAML (``model.prompt.n_ctx``, ``model.optim.prompt_lr``...).

    Args:
        model_name: open_clip model name (``ViT-B-32-quickgelu`` for the OpenAI weights).
        pretrained: open_clip tag (``openai``), checkpoint path, ``synthetic[:seed]`` or None
            (random weights drawn with ``init_seed``, so a checkpoint can rebuild them).
        model_config: optional path to an open_clip model-config JSON to register first.
        init_seed: seed of the random weights when ``pretrained`` is None.
        method: ``p4q`` (prompts + adapter + distillation on the PTQ student), ``coop``
            (prompts on the float model), ``ptq`` (PTQ student, template classifier, no
            training), ``zeroshot`` (float model, template classifier, no training), or a
            few-shot baseline on the same student: ``tip_adapter``, ``tip_adapter_f``,
            ``clip_lora``, ``kgcoop`` (see :mod:`p4q_lightning.methods`).
        quant: quantization preset (``w8a8``, ``w4a4``, ``p4q-official``, ...) or QuantSpec dict.
        quant_overrides: per-group changes, e.g. ``{"attn_internals": {"a_bits": 8}}``.
        prompt: the learned prompt (context length, initialisation, text-tower chunking).
        adapter: the low-bit image-feature adapter (``p4q`` only).
        loss: cross-entropy and distillation weights, the distillation target.
        optim: learning rates, momentum, weight decay and warmup of prompt and adapter.
        features: the image-feature cache (augmented views, directory).
        logit_scale: fixed logit scale (the official code uses 100); None uses the model's.
        classnames: override the datamodule's class names (same number of classes).
        templates: override the datamodule's prompt templates (each with one ``{}``).
        tip: Tip-Adapter's alpha, beta and their validation search (``tip_adapter*``).
        lora: CLIP-LoRA's rank, alpha and dropout (``clip_lora``).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        model_config: str | None = None,
        init_seed: int = 0,
        method: Method = "p4q",
        quant: str | dict[str, Any] = "w8a8",
        quant_overrides: dict[str, dict[str, Any]] | None = None,
        prompt: PromptArgs = PromptArgs(),
        adapter: AdapterArgs = AdapterArgs(),
        loss: LossArgs = LossArgs(),
        optim: OptimArgs = OptimArgs(),
        features: FeatureArgs = FeatureArgs(),
        logit_scale: float | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        tip: TipArgs = TipArgs(),
        lora: LoRAArgs = LoRAArgs(),
    ) -> None:
        super().__init__()
        traits(method)  # an unknown method fails before any model is built
        self.prompt_args = as_group(PromptArgs, prompt, "model.prompt")
        self.adapter_args = as_group(AdapterArgs, adapter, "model.adapter")
        self.loss_args = as_group(LossArgs, loss, "model.loss")
        self.optim_args = as_group(OptimArgs, optim, "model.optim")
        self.features_args = as_group(FeatureArgs, features, "model.features")
        self.tip_args = as_group(TipArgs, tip, "model.tip")
        self.lora_args = as_group(LoRAArgs, lora, "model.lora")
        # plain values only: checkpoints are read back with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "pretrained": pretrained,
                "model_config": model_config,
                "init_seed": init_seed,
                "method": method,
                "quant": quant,
                "quant_overrides": quant_overrides,
                **{group: dataclasses.asdict(getattr(self, f"{group}_args")) for group in GROUPS},
                "logit_scale": logit_scale,
                "classnames": classnames,
                "templates": templates,
            }
        )
        self.method: str = method
        self.classifier = P4QClassifier.build(
            model_name,
            pretrained,
            model_config,
            init_seed,
            method,
            quant,
            quant_overrides,
            prompt=self.prompt_args,
            adapter=self.adapter_args,
            teacher_text=self.loss_args.teacher_text,
            logit_scale=logit_scale,
            templates=templates,
            tip=self.tip_args,
            lora=self.lora_args,
        )
        self._train_source: TrainFeatureSource | None = None
        self._offload: FrozenOffload | None = None  # frozen towers out of memory during fit
        self._trained = False  # set by a fit or a loaded checkpoint / state dict
        self._tip_searched_step: int | None = None  # global step of the last alpha/beta search
        # test sets after the run's own split (DG, cross-dataset, base-to-novel's new half):
        # what the datamodule's ``test_sets`` lists, their metrics and class embeddings
        self._extra_sets: list[Any] = []
        self._extra_text: list[torch.Tensor] = []
        self.extra_test_metrics = torch.nn.ModuleList()
        if classnames:
            self.set_classes(classnames, templates)

    def _attached_trainer(self) -> Trainer | None:
        """The Trainer running this module, or None (``self.trainer`` raises when unattached)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ------------------------------------------------------------------ classes
    def set_classes(
        self, classnames: Sequence[str], templates: Sequence[str] | None = None
    ) -> None:
        """Set the class list (and templates): builds or re-targets the prompts and metrics."""
        changed = self.classifier.set_classes(classnames, templates)
        if changed or not hasattr(self, "val_top1"):
            self._build_metrics(len(self.classifier.classnames))

    def _build_metrics(self, num_classes: int) -> None:
        k5 = min(5, num_classes)
        device = self.classifier.device  # may be rebuilt after the move to a GPU
        for stage in ("val", "test"):
            for name, k in (("top1", 1), ("top5", k5)):
                metric = MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
                setattr(self, f"{stage}_{name}", metric)

    def _classes_from_datamodule(self) -> tuple[list[str] | None, list[str] | None]:
        dm = getattr(self._attached_trainer(), "datamodule", None)
        names = getattr(dm, "classnames", None)
        templates = getattr(dm, "templates", None)
        return (list(names) if names else None), (list(templates) if templates else None)

    def setup(self, stage: str) -> None:
        self._restore_frozen()  # a fit that failed left its frozen weights out (no hook then)
        names, templates = self._classes_from_datamodule()
        explicit = self.hparams.classnames
        if explicit and names and len(explicit) != len(names):
            raise ValueError(
                f"model.classnames has {len(explicit)} classes but the datamodule has "
                f"{len(names)}; "
                "drop model.classnames or make them match the dataset"
            )
        chosen = explicit or names or self.classifier.classnames
        if not chosen:
            raise ValueError(
                "P4QModule needs class names: use a datamodule with a `classnames` attribute "
                "(e.g. FewShotDataModule) or pass model.classnames"
            )
        self.set_classes(chosen, self.hparams.templates or templates)
        self._check_image_size()
        if stage in ("fit", "test"):
            self._setup_extra_test_sets()
        if stage in ("validate", "test"):
            self._check_not_empty(stage)
        if stage == "fit":
            if not self.traits.fits:
                raise ValueError(
                    f"method={self.method!r} has nothing to train: run `validate` or `test` "
                    "(e.g. `lightning test --config ...`) instead of `fit`"
                )
            self._check_trainable()
            self._check_feature_cache()
            # The frozen CLIPs are in eval mode on purpose; Lightning would warn about each fit.
            warnings.filterwarnings(
                "ignore", message=r".*module\(s\) in eval mode at the start of training"
            )
            if not self.traits.trains:  # Tip-Adapter: fit builds the cache, no optimiser
                warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None")
            identity = ("model_name", "pretrained", "model_config", "init_seed")
            self._train_source = TrainFeatureSource.attach(
                self.trainer,
                self.classifier,
                self.features_args,
                distills=self.distills,
                identity={k: self.hparams[k] for k in identity},
            )

    def _setup_extra_test_sets(self) -> None:
        """Metrics for each test set after the run's own (``test/<name>/top1``...)."""
        sets = getattr(getattr(self._attached_trainer(), "datamodule", None), "test_sets", None)
        self._extra_sets = list(sets[1:]) if sets else []
        for test_set in self._extra_sets:
            check_scorable(self.classifier, test_set)
        device = self.classifier.device
        self.extra_test_metrics = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    name: MulticlassAccuracy(len(t.classnames), top_k=k, average="micro")
                    for name, k in (("top1", 1), ("top5", min(5, len(t.classnames))))
                }
            ).to(device)
            for t in self._extra_sets
        )

    def _check_not_empty(self, stage: str) -> None:
        """Lightning skips an evaluation over 0 batches and reports success: refuse it."""
        dm = getattr(self._attached_trainer(), "datamodule", None)
        make = getattr(dm, "test_dataloader" if stage == "test" else "val_dataloader", None)
        if make is None:
            return
        try:
            loaders = make()
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            empty = any(len(loader) == 0 for loader in loaders)
        except (TypeError, NotImplementedError):  # no loader or no length: nothing to check
            return
        if empty:
            split = "test" if stage == "test" else "validation"
            raise ValueError(
                f"the {split} split has 0 items, so `{stage}` would evaluate nothing and report "
                "success; check the dataset's evaluation split (with few-shot splits and no test "
                "split, the shots may use up every training image: lower data.shots)"
            )

    def _check_image_size(self) -> None:
        """A datamodule resizing to another side than the model's fails here, in one line."""
        dm = getattr(self._attached_trainer(), "datamodule", None)
        size = getattr(dm, "image_size", None)
        model_size = getattr(getattr(self.classifier.teacher, "visual", None), "image_size", None)
        if isinstance(model_size, (tuple, list)):
            model_size = model_size[0] if len(set(model_size)) == 1 else None
        if isinstance(size, int) and isinstance(model_size, int) and size != model_size:
            raise ValueError(
                f"the data is resized to {size} pixels but {self.hparams.model_name} takes "
                f"{model_size}x{model_size} images; set data.init_args.image_size: {model_size}"
            )

    def _check_trainable(self) -> None:
        def allowed(name: str) -> bool:
            if name.startswith(("prompt_learner.", "adapter.", "tip_cache.")):
                return True
            return name.startswith("student.") and name.endswith((".lora_A", ".lora_B"))

        wrong = [n for n in self.classifier.trainable_parameter_names() if not allowed(n)]
        if wrong:
            raise RuntimeError(
                "only prompt and adapter parameters (and CLIP-LoRA's factors, Tip-Adapter-F's "
                f"cache keys) may train, but these require grad: {wrong[:5]}"
            )

    def _check_feature_cache(self) -> None:
        """Tip-Adapter's cache is the feature cache's views; CLIP-LoRA cannot use one."""
        views = self.features_args.views
        if self.traits.tip_cache and views == 0:
            raise ValueError(
                f"method={self.method!r} builds its cache from the cached image features, but "
                "model.features.views is 0: set model.features.views to 1 or more (10 published)"
            )
        if self.traits.image_tower_trains and views > 0:
            log.info(
                "method=%r trains the image tower: model.features.views=%d is not used (images "
                "run through both towers on every step)",
                self.method,
                views,
            )

    # ------------------------------------------------------------------ training
    @property
    def traits(self) -> MethodTraits:
        """What ``method`` does (see :mod:`p4q_lightning.methods`)."""
        return traits(self.method)

    @property
    def distills(self) -> bool:
        """Whether the loss has a distillation term (so the teacher's features are needed)."""
        return self.traits.distils and self.loss_args.distill_weight > 0

    def on_train_epoch_start(self) -> None:
        if self._train_source is not None:
            self._train_source.set_epoch(self.current_epoch)

    def _batch_features(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if isinstance(batch, dict):  # cached features
            teacher = batch.get("teacher")
            return (
                batch["student"].float(),
                None if teacher is None else teacher.float(),
                batch["label"],
            )
        images, labels = batch[0], batch[1]
        model = self.classifier
        teacher = model.teacher_image_features(images) if self.distills else None
        return model.train_image_features(images), teacher, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if _is_empty(batch):
            return None  # every image of the batch was skipped as corrupt: skip the step
        student_feats, teacher_feats, labels = self._batch_features(batch)
        model, loss = self.classifier, self.loss_args
        text = model.student_text_features(sharded=True)
        # Tip-Adapter-F trains with the initial alpha and beta; the searched ones evaluate
        scalars = (self.tip_args.alpha, self.tip_args.beta) if self.traits.trains_cache else None
        logits = model.logits_from_features(student_feats, text, scalars)
        teacher_logits = None
        if self.distills:
            teacher_logits = cosine_logits(
                teacher_feats, model.teacher_text_features(sharded=True), model.logit_scale
            )
        parts = p4q_loss(
            logits,
            labels,
            teacher_logits,
            loss,
        )
        if self.traits.anchors_prompt and loss.kg_weight:
            parts["kg"] = kgcoop_loss(text, model.anchor_text_features())
            parts["loss"] = parts["loss"] + loss.kg_weight * parts["kg"]
        batch_size = labels.shape[0]
        # Per-step training logs stay rank-local (no collective per step); evaluation syncs.
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/ce", parts["ce"], batch_size=batch_size)
        for name in ("distill", "kg"):
            if name in parts:
                self.log(f"train/{name}", parts[name], batch_size=batch_size)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("train/top1", acc, batch_size=batch_size)
        return parts["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.traits.trains_prompts or self.traits.lora:
            self.classifier.invalidate_text()  # the prompt (or LoRA's text tower) changed
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                self.log(
                    f"lr/{group.get('name', 'group')}", group["lr"], on_step=True, on_epoch=False
                )

    def configure_optimizers(self) -> Any:
        if not self.traits.trains:
            return None  # Tip-Adapter: fit builds the cache and trains nothing
        return optim.configure(self.classifier, self.optim_args, self.trainer)

    def on_train_start(self) -> None:
        self._trained = True
        if self._train_source is not None:
            self._train_source.fill()  # calibrated by now (CalibrationCallback.on_fit_start)
        if self.classifier.tip_cache is not None:
            self._build_tip_cache()
            if not self.traits.trains:
                self._search_tip_scalars()
                self.trainer.should_stop = True  # nothing to train: no epoch runs
                return  # and nothing to release: the fit ends here
        if self._train_source is not None:
            self._encode_fixed_step_text()  # before the token tables leave memory
            # from here on the steps read cached features: the frozen towers can leave memory
            self.classifier.teacher_fingerprint()  # checkpoints record it; computed once, now
            if self.distills:
                self.classifier.teacher_text_features()  # the text targets, cached (templates)
            used, towers = self.classifier.cached_step_modules(self.distills)
            self._offload = FrozenOffload(towers, keep=used)
            self._offload.release()

    def _encode_fixed_step_text(self) -> None:
        """Cache the class embeddings a training step reads but never changes (Tip-Adapter-F's
        template classifier, KgCoOp's hand-written anchor): they need the token tables that
        the fit releases."""
        model = self.classifier
        if not self.traits.trains_prompts:
            model.student_text_features()
        if self.traits.anchors_prompt:
            model.anchor_text_features()

    def on_train_epoch_end(self) -> None:
        trainer = self.trainer
        if (
            self.traits.trains_cache
            and _is_last_epoch(trainer)
            and self._tip_searched_step != trainer.global_step
        ):
            # Tip-Adapter-F whose last epoch ran no validation: search alpha and beta for the
            # final keys here (before the epoch-end checkpoint), not keep the last
            # validation's pair, found for older keys
            self._restore_frozen(close=False)  # the search runs the student's image tower
            self._search_tip_scalars()

    def on_train_end(self) -> None:
        self._restore_frozen()  # before on_fit_end's export and comparison read the towers

    def _restore_frozen(self, close: bool = True) -> None:
        if self._offload is not None:
            if close:
                self._offload.close()
                self._offload = None
            else:
                self._offload.restore()

    def _build_tip_cache(self) -> None:
        """Keys: the student's features of the training images over the feature cache's
        views; values: their labels."""
        source = self._train_source
        cache = source.cache if source is not None else None
        if cache is None:
            raise RuntimeError(
                f"method={self.method!r} builds its cache from the cached training features, "
                "but none were cached: use a datamodule with FeatureServing (e.g. "
                "FewShotDataModule) and model.features.views >= 1"
            )
        model = self.classifier
        assert model.tip_cache is not None
        model.tip_cache.build(
            cache.features["student"].to(self.device),
            cache.labels.to(self.device),
            len(model.classnames),
        )
        model.tip_cache.set_scalars(self.tip_args.alpha, self.tip_args.beta)

    def _search_tip_scalars(self) -> None:
        """Tip-Adapter's grid search of alpha and beta on the validation split."""
        args, model = self.tip_args, self.classifier
        if not args.search:
            return
        dm = getattr(self.trainer, "datamodule", None)
        make = getattr(dm, "val_dataloader", None)
        if make is None:
            raise ValueError(
                "tip.search needs a validation split (a datamodule with val_dataloader()); "
                "set model.tip.search: false to keep tip.alpha and tip.beta"
            )
        feats, labels = [], []
        with torch.no_grad():
            for batch in make():
                if _is_empty(batch):
                    continue
                feats.append(model.student_image_features(batch[0]))
                labels.append(batch[1].to(self.device))
            if not feats:
                raise ValueError("tip.search: the validation split has no images")
            features, targets = torch.cat(feats), torch.cat(labels)
            cache = model.tip_cache
            assert cache is not None
            text = model.student_text_features()
            zero_shot = cosine_logits(features, text, model.logit_scale)
            alpha, beta, acc = search_alpha_beta(
                zero_shot,
                cache.affinity(features),
                cache.values,
                targets,
                grid(args.search_beta_max, args.search_beta_steps),
                grid(args.search_alpha_max, args.search_alpha_steps),
            )
        cache.set_scalars(alpha, beta)
        self._tip_searched_step = self.trainer.global_step
        log.info("Tip-Adapter search: alpha=%.3f beta=%.3f (val top-1 %.4f)", alpha, beta, acc)
        for logger in self.loggers:
            logger.log_metrics({"tip/alpha": alpha, "tip/beta": beta, "tip/val_top1": acc})

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._restore_frozen()
        if stage == "fit" and self._train_source is not None:
            self._train_source.detach()

    # ------------------------------------------------------------------ evaluation
    def _start_eval(self) -> None:
        self.classifier.freeze_eval_text(sharded=True)

    def on_validation_start(self) -> None:
        self._restore_frozen(close=False)  # validation inside a fit runs the image towers
        self._check_evaluation("val")

    def on_validation_end(self) -> None:
        if self._offload is not None and not self.trainer.sanity_checking:
            self._encode_fixed_step_text()  # validation's end forgot them
            self._offload.release()  # back to training from the cache

    def on_test_start(self) -> None:
        self._check_evaluation("test")

    def _check_evaluation(self, stage: str) -> None:
        """Warn loudly about evaluating an untrained prompt."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        if self.traits.fits and not self._trained and trainer.state.fn != "fit":
            message = (
                f"evaluating method={self.method!r} with an UNTRAINED "
                f"{self.traits.fitted_state}: no checkpoint was loaded and no fit ran in this "
                f"process, so these numbers are not {self.method} results. Pass --ckpt_path "
                "(e.g. the run's checkpoints/last.ckpt) or run fit first"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            log.warning(message)

    def on_validation_epoch_start(self) -> None:
        trainer = self.trainer
        if self.traits.trains_cache and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # Tip-Adapter-F: alpha and beta searched on the validation split for the keys as
            # trained so far, so each validation and each checkpoint uses them
            self._search_tip_scalars()
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._extra_text = []
        templates = self.hparams.templates
        with torch.no_grad():
            for test_set in self._extra_sets:  # before the own split's text: this resets it
                with scoring_classes(self.classifier, test_set, templates) as rows:
                    text = self.classifier.student_text_features(sharded=True).detach()
                    self._extra_text.append(rows(text))
        self._start_eval()

    def on_predict_epoch_start(self) -> None:
        self._start_eval()

    def on_validation_epoch_end(self) -> None:
        self.classifier.invalidate_text()

    def on_test_epoch_end(self) -> None:
        self.classifier.invalidate_text()
        self._extra_text = []

    def on_predict_epoch_end(self) -> None:
        self.classifier.invalidate_text()

    def _eval_step(self, batch: Any, stage: str) -> None:
        if _is_empty(batch):
            return
        images, labels = batch[0], batch[1]
        with torch.no_grad():
            logits = self.classifier.student_logits(images)
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        top1.update(logits, labels)
        top5.update(logits, labels)
        self._log_eval(stage, logits, labels, top1, top5, prog_bar=True)

    def _log_eval(
        self, prefix: str, logits: Any, labels: Any, top1: Any, top5: Any, prog_bar: bool = False
    ) -> None:
        n = labels.shape[0]
        # one name per test set even when several test loaders run (no "/dataloader_idx_N")
        options = dict(batch_size=n, sync_dist=True, add_dataloader_idx=False)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), **options)
        self.log(f"{prefix}/top1", top1, prog_bar=prog_bar, **options)
        self.log(f"{prefix}/top5", top5, **options)

    def _extra_test_step(self, batch: Any, index: int) -> None:
        """A batch of the ``index``-th extra test set, scored by its own class embeddings."""
        if _is_empty(batch):
            return
        images, labels = batch[0], batch[1]
        model = self.classifier
        with torch.no_grad():
            features = model.student_image_features(images)
            logits = model.logits_from_features(features, self._extra_text[index])
        metrics = self.extra_test_metrics[index]
        metrics["top1"].update(logits, labels)
        metrics["top5"].update(logits, labels)
        name = self._extra_sets[index].name
        self._log_eval(f"test/{name}", logits, labels, metrics["top1"], metrics["top5"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._eval_step(batch, "test")
        else:
            self._extra_test_step(batch, dataloader_idx - 1)

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            logits = self.classifier.student_logits(images)
        return {"logits": logits, "pred": logits.argmax(dim=-1)}

    # ------------------------------------------------------------------ callbacks and checkpoints
    def configure_callbacks(self) -> list[Any]:
        from p4q_lightning.callbacks.calibration import CalibrationCallback

        trainer = self._attached_trainer()
        existing = trainer.callbacks if trainer is not None else []
        if any(isinstance(cb, CalibrationCallback) for cb in existing):
            return []
        return [CalibrationCallback()]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only what a run cannot rebuild: prompts, adapter, quantizer parameters."""
        return checkpointing.filter_state_dict(
            self.classifier, super().state_dict(*args, **kwargs), kwargs.get("prefix", "")
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._trained = True
        return checkpointing.load_state_dict(
            self.classifier, state_dict, strict, assign, super().load_state_dict
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.save_metadata(self.classifier, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._attached_trainer()  # none in load_from_checkpoint and p4q export
        source = trainer.ckpt_path if trainer is not None else None
        classes = checkpointing.load_metadata(
            self.classifier, checkpoint, self.hparams, str(source) if source else "being loaded"
        )
        if classes is not None:
            self.set_classes(*classes)


def _is_empty(batch: Any) -> bool:
    """A batch whose every image was skipped as corrupt (``collate_skip_none``)."""
    labels = batch["label"] if isinstance(batch, dict) else batch[1]
    return labels.shape[0] == 0


def _is_last_epoch(trainer: Any) -> bool:
    """Whether the fit ends after the epoch now ending (its epoch or step budget is spent)."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return 0 < trainer.max_steps <= trainer.global_step or bool(trainer.should_stop)
