"""``P4QModule``: P4Q and its baselines (CoOp, PTQ, zero-shot) as one LightningModule.

Thin glue: the float teacher and the quantized student are frozen open_clip models; the prompt
learner and the low-bit adapter are the only trainable parameters. Text towers, losses, feature
caching, checkpoint filtering and optimisers live in their own modules.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy

from p4q_lightning.losses import cosine_logits, p4q_loss
from p4q_lightning.methods import Method, MethodTraits, traits
from p4q_lightning.model.adapter import LowBitAdapter
from p4q_lightning.model.build import build_teacher, image_feature_dim
from p4q_lightning.model.classifier import P4QClassifierMixin
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower
from p4q_lightning.quant import get_spec, is_calibrated, quantize
from p4q_lightning.training import checkpointing, optim, seeding
from p4q_lightning.training.feature_source import TrainFeatureSource

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}."]


class P4QModule(P4QClassifierMixin, LightningModule):
    """P4Q on an open_clip CLIP, or one of its baselines, selected by ``method``.

    Features, logits and calibration come from :class:`P4QClassifierMixin`; this class is the
    Lightning glue (setup, steps, metrics, optimisers, checkpoints).

    Args:
        model_name: open_clip model name (``ViT-B-32-quickgelu`` for the OpenAI weights).
        pretrained: open_clip tag (``openai``), checkpoint path, ``synthetic[:seed]`` or None
            (random weights drawn with ``init_seed``, so a checkpoint can rebuild them).
        model_config: optional path to an open_clip model-config JSON to register first.
        init_seed: seed of the random weights when ``pretrained`` is None.
        method: ``p4q`` (prompts + adapter + distillation on the PTQ student), ``coop``
            (prompts on the float model), ``ptq`` (PTQ student, template classifier, no
            training) or ``zeroshot`` (float model, template classifier, no training).
        quant: quantization preset (``w8a8``, ``w4a4``, ``p4q-official``, ...) or QuantSpec dict.
        quant_overrides: per-group changes, e.g. ``{"attn_internals": {"a_bits": 8}}``.
        n_ctx: number of learned prompt context vectors (CoOp: 16).
        ctx_init: initialise the context from this phrase (e.g. ``a photo of a``; sets n_ctx).
        class_specific: one context per class (CoOp's CSC) instead of one shared context.
        class_token_position: where the class name sits in the prompt: end, middle or front.
        ctx_init_std: std of the random context initialisation (when ctx_init is None).
        adapter: train the low-bit adapter (``p4q`` only); its bits are the spec's ``adapter``
            group.
        adapter_reduction: the adapter's bottleneck is the embedding width / this.
        adapter_ratio: blend of adapted and original image features (0: adapter off).
        adapter_bias: give the adapter's linear layers a bias.
        logit_scale: fixed logit scale (the official code uses 100); None uses the model's.
        ce_weight: weight of the cross-entropy loss on the labels.
        distill_weight: weight of the distillation loss from the float teacher (0: none).
        distill_kind: ``kd`` (standard, with distill_temperature) or ``official`` (the
            official code's expression).
        distill_temperature: softmax temperature of the ``kd`` distillation.
        teacher_text: the teacher's classifier: ``templates`` (mean template embedding) or
            ``prompt`` (the learned prompt through the float text tower).
        prompt_lr: SGD learning rate of the prompt context.
        prompt_momentum: SGD momentum of the prompt context.
        prompt_weight_decay: SGD weight decay of the prompt context.
        adapter_lr: AdamW learning rate of the adapter.
        adapter_weight_decay: AdamW weight decay of the adapter.
        adapter_eps: AdamW epsilon of the adapter.
        warmup_epochs: epochs of constant-lr warmup before the per-step cosine schedule.
        warmup_lr: the learning rate during warmup.
        feature_views: augmented views of the training set whose image features are cached
            (0 = live augmentation: both image towers run on every step).
        feature_cache_dir: directory to keep the feature cache between runs (None: memory only).
        text_chunk_size: classes per text-tower chunk (None: all at once).
        text_checkpointing: recompute text-tower chunks in the backward pass (saves memory).
        classnames: override the datamodule's class names (same number of classes).
        templates: override the datamodule's prompt templates (each with one ``{}``).
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
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Literal["end", "middle", "front"] = "end",
        ctx_init_std: float = 0.02,
        adapter: bool = True,
        adapter_reduction: int = 4,
        adapter_ratio: float = 0.2,
        adapter_bias: bool = True,
        logit_scale: float | None = None,
        ce_weight: float = 1.0,
        distill_weight: float = 1.0,
        distill_kind: Literal["kd", "official"] = "kd",
        distill_temperature: float = 1.0,
        teacher_text: Literal["templates", "prompt"] = "templates",
        prompt_lr: float = 2e-3,
        prompt_momentum: float = 0.9,
        prompt_weight_decay: float = 5e-4,
        adapter_lr: float = 1e-3,
        adapter_weight_decay: float = 1e-2,
        adapter_eps: float = 1e-8,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-5,
        feature_views: int = 10,
        feature_cache_dir: str | None = None,
        text_chunk_size: int | None = None,
        text_checkpointing: bool = False,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        method_traits = traits(method)
        if teacher_text not in ("templates", "prompt"):
            raise ValueError(f"teacher_text={teacher_text!r}: use 'templates' or 'prompt'")
        if feature_views < 0:
            raise ValueError(
                f"feature_views={feature_views}: use 0 (live augmentation) or a positive count"
            )
        self.save_hyperparameters()
        self.method: str = method
        self.quant_spec = (
            get_spec(quant, quant_overrides) if method_traits.quantized else get_spec("fp")
        )
        self.teacher, self.tokenizer = build_teacher(
            model_name, pretrained, model_config, init_seed
        )
        self.student = (
            quantize(self.teacher, self.quant_spec) if method_traits.quantized else self.teacher
        )
        self.adapter: LowBitAdapter | None = None
        if method_traits.uses_adapter and adapter:
            # drawn from the run seed, not from wherever the global generator happens to be
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeding.derived_seed("adapter", init_seed))
                self.adapter = LowBitAdapter(
                    image_feature_dim(self.teacher),
                    adapter_reduction,
                    adapter_ratio,
                    adapter_bias,
                    self.quant_spec["adapter"],
                )
        self.prompt_learner: PromptLearner | None = None
        self.classnames: list[str] = []
        self.templates: list[str] = list(templates or DEFAULT_TEMPLATES)
        self.register_buffer("_teacher_text", None, persistent=False)
        self.register_buffer("_student_template_text", None, persistent=False)
        self._eval_text: torch.Tensor | None = None
        self._train_source: TrainFeatureSource | None = None
        self._teacher_checksum: float | None = None
        self._trained = False  # set by a fit or a loaded checkpoint / state dict
        if classnames:
            self.set_classes(classnames, templates)

    # ------------------------------------------------------------------ classes
    def set_classes(
        self, classnames: Sequence[str], templates: Sequence[str] | None = None
    ) -> None:
        """Set the class list (and templates): builds or re-targets the prompts and metrics."""
        classnames = [str(c) for c in classnames]
        if templates:
            self.templates = list(templates)
        changed = classnames != self.classnames
        self.classnames = classnames
        if self.traits.trains_prompts:
            if self.prompt_learner is None:
                hp = self.hparams
                self.prompt_learner = PromptLearner(
                    classnames,
                    self.tokenizer,
                    TextTower(self.teacher).width,
                    hp.n_ctx,
                    hp.ctx_init,
                    TextTower(self.teacher).token_embedding,
                    hp.class_specific,
                    hp.class_token_position,
                    hp.ctx_init_std,
                    # the same on every rank and whenever setup() runs (DDP re-seeds per rank)
                    generator=seeding.generator("prompt", hp.init_seed),
                ).to(self.teacher.logit_scale.device)
            elif changed:
                self.prompt_learner.set_classnames(classnames)
            if is_calibrated(self.student):
                self.prompt_learner.set_token_embedding(TextTower(self.student).token_embedding)
        if changed or not hasattr(self, "val_top1"):
            self._teacher_text = None
            self._student_template_text = None
            self._build_metrics(len(classnames))

    def _build_metrics(self, num_classes: int) -> None:
        k5 = min(5, num_classes)
        device = self.teacher.logit_scale.device  # may be rebuilt after the move to a GPU
        for stage in ("val", "test"):
            for name, k in (("top1", 1), ("top5", k5)):
                metric = MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
                setattr(self, f"{stage}_{name}", metric)

    def _classes_from_datamodule(self) -> tuple[list[str] | None, list[str] | None]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "classnames", None)
        templates = getattr(dm, "templates", None)
        return (list(names) if names else None), (list(templates) if templates else None)

    def setup(self, stage: str) -> None:
        names, templates = self._classes_from_datamodule()
        explicit = self.hparams.classnames
        if explicit and names and len(explicit) != len(names):
            raise ValueError(
                f"model.classnames has {len(explicit)} classes but the datamodule has "
                f"{len(names)}; "
                "drop model.classnames or make them match the dataset"
            )
        chosen = explicit or names or self.classnames
        if not chosen:
            raise ValueError(
                "P4QModule needs class names: use a datamodule with a `classnames` attribute "
                "(e.g. FewShotDataModule) or pass model.classnames"
            )
        self.set_classes(chosen, self.hparams.templates or templates)
        self._check_image_size()
        if stage in ("validate", "test"):
            self._check_not_empty(stage)
        if stage == "fit":
            if not self.traits.trains:
                raise ValueError(
                    f"method={self.method!r} has nothing to train: run `validate` or `test` "
                    "(e.g. `lightning test --config ...`) instead of `fit`"
                )
            self._check_trainable()
            # The frozen CLIPs are in eval mode on purpose; Lightning would warn about each fit.
            warnings.filterwarnings(
                "ignore", message=r".*module\(s\) in eval mode at the start of training"
            )
            self._train_source = TrainFeatureSource.attach(self)

    def _check_not_empty(self, stage: str) -> None:
        """Lightning skips an evaluation over 0 batches and reports success: refuse it."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        make = getattr(dm, "test_dataloader" if stage == "test" else "val_dataloader", None)
        if make is None:
            return
        try:
            loader = make()
            empty = len(loader) == 0
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
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        model_size = getattr(getattr(self.teacher, "visual", None), "image_size", None)
        if isinstance(model_size, (tuple, list)):
            model_size = model_size[0] if len(set(model_size)) == 1 else None
        if isinstance(size, int) and isinstance(model_size, int) and size != model_size:
            raise ValueError(
                f"the data is resized to {size} pixels but {self.hparams.model_name} takes "
                f"{model_size}x{model_size} images; set data.init_args.image_size: {model_size}"
            )

    def _check_trainable(self) -> None:
        allowed = ("prompt_learner.", "adapter.")
        wrong = [
            n for n, p in self.named_parameters() if p.requires_grad and not n.startswith(allowed)
        ]
        if wrong:
            raise RuntimeError(
                f"only prompt and adapter parameters may train, but these require grad: {wrong[:5]}"
            )

    # ------------------------------------------------------------------ training
    @property
    def traits(self) -> MethodTraits:
        """What ``method`` does (see :mod:`p4q_lightning.methods`)."""
        return traits(self.method)

    @property
    def distills(self) -> bool:
        return self.traits.distils and self.hparams.distill_weight > 0

    def train(self, mode: bool = True) -> P4QModule:
        """Frozen CLIPs stay in eval mode (no dropout, fused attention) while the rest trains."""
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

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
        teacher = self.teacher_image_features(images) if self.distills else None
        return self.student_image_features(images), teacher, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if _is_empty(batch):
            return None  # every image of the batch was skipped as corrupt: skip the step
        student_feats, teacher_feats, labels = self._batch_features(batch)
        hp = self.hparams
        logits = cosine_logits(
            self._adapt(student_feats), self.student_text_features(sharded=True), self.logit_scale
        )
        teacher_logits = None
        if self.distills:
            teacher_logits = cosine_logits(
                teacher_feats, self.teacher_text_features(sharded=True), self.logit_scale
            )
        parts = p4q_loss(
            logits,
            labels,
            teacher_logits,
            hp.ce_weight,
            hp.distill_weight,
            hp.distill_kind,
            hp.distill_temperature,
        )
        batch_size = labels.shape[0]
        # Per-step training logs stay rank-local (no collective per step); evaluation syncs.
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/ce", parts["ce"], batch_size=batch_size)
        if "distill" in parts:
            self.log("train/distill", parts["distill"], batch_size=batch_size)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("train/top1", acc, batch_size=batch_size)
        return parts["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.invalidate_text()  # the prompt changed
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                self.log(
                    f"lr/{group.get('name', 'group')}", group["lr"], on_step=True, on_epoch=False
                )

    def configure_optimizers(self) -> Any:
        return optim.configure(self)

    def on_train_start(self) -> None:
        self._trained = True
        if self._train_source is not None:
            self._train_source.fill()  # calibrated by now (CalibrationCallback.on_fit_start)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._train_source is not None:
            self._train_source.detach()

    # ------------------------------------------------------------------ evaluation
    def _start_eval(self) -> None:
        with torch.no_grad():
            self._eval_text = self.student_text_features(sharded=True).detach()

    def on_validation_start(self) -> None:
        self._check_evaluation("val")

    def on_test_start(self) -> None:
        self._check_evaluation("test")

    def _check_evaluation(self, stage: str) -> None:
        """Warn loudly about evaluating an untrained prompt."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        if self.traits.trains and not self._trained and trainer.state.fn != "fit":
            message = (
                f"evaluating method={self.method!r} with an UNTRAINED prompt"
                f"{' and adapter' if self.adapter is not None else ''}: no checkpoint was "
                "loaded and no fit ran in this process, so these numbers are not P4Q/CoOp "
                "results. Pass --ckpt_path (e.g. the run's checkpoints/last.ckpt) or run fit first"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            log.warning(message)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def on_predict_epoch_start(self) -> None:
        self._start_eval()

    def on_validation_epoch_end(self) -> None:
        self._eval_text = None

    def on_test_epoch_end(self) -> None:
        self._eval_text = None

    def on_predict_epoch_end(self) -> None:
        self._eval_text = None

    def _eval_step(self, batch: Any, stage: str) -> None:
        if _is_empty(batch):
            return
        images, labels = batch[0], batch[1]
        with torch.no_grad():
            logits = self.student_logits(images)
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        top1.update(logits, labels)
        top5.update(logits, labels)
        n = labels.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), batch_size=n, sync_dist=True)
        self.log(f"{stage}/top1", top1, batch_size=n, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/top5", top5, batch_size=n, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            logits = self.student_logits(images)
        return {"logits": logits, "pred": logits.argmax(dim=-1)}

    # ------------------------------------------------------------------ callbacks and checkpoints
    def configure_callbacks(self) -> list[Any]:
        from p4q_lightning.callbacks.calibration import CalibrationCallback

        existing = self._trainer.callbacks if self._trainer is not None else []
        if any(isinstance(cb, CalibrationCallback) for cb in existing):
            return []
        return [CalibrationCallback()]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only what a run cannot rebuild: prompts, adapter, quantizer parameters."""
        return checkpointing.filter_state_dict(
            self, super().state_dict(*args, **kwargs), kwargs.get("prefix", "")
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._trained = True
        return checkpointing.load_state_dict(
            self, state_dict, strict, assign, super().load_state_dict
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.save_metadata(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.load_metadata(self, checkpoint)


def _is_empty(batch: Any) -> bool:
    """A batch whose every image was skipped as corrupt (``collate_skip_none``)."""
    labels = batch["label"] if isinstance(batch, dict) else batch[1]
    return labels.shape[0] == 0
