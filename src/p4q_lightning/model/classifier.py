"""``P4QClassifier``: P4Q (or a baseline) as a plain ``nn.Module``, without Lightning.

It owns the frozen float teacher, the PTQ student, the prompt learner, the low-bit adapter and
the class list, and computes calibration, image and text features and logits. ``P4QModule``
holds one and adds the Lightning glue; callbacks, the exporter and the feature cache use the
classifier's public methods, never the module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning import seeding
from p4q_lightning.args import AdapterArgs, LoRAArgs, PromptArgs, TipArgs
from p4q_lightning.losses import cosine_logits
from p4q_lightning.methods import MethodTraits, traits
from p4q_lightning.model.adapter import LowBitAdapter, adapted_image_features
from p4q_lightning.model.build import build_teacher, image_feature_dim, weight_fingerprint
from p4q_lightning.model.lora import install_lora, lora_layers, lora_parameters
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts, template_text_features
from p4q_lightning.model.text_sharding import gather_sharded
from p4q_lightning.model.tip_adapter import TipCache
from p4q_lightning.quant import QuantSpec, get_spec, is_calibrated, quantize
from p4q_lightning.quant import calibrate as calibrate_student
from p4q_lightning.quant.calibrate import CALIB_BATCH_SIZE, image_batches

DEFAULT_TEMPLATES = ["a photo of a {}."]


class P4QClassifier(nn.Module):
    """Image-to-class logits of a frozen (quantized) CLIP with a learned prompt and adapter.

    Args:
        teacher: the frozen float CLIP (open_clip model).
        tokenizer: its tokenizer.
        method: ``p4q``, ``coop``, ``ptq`` or ``zeroshot`` (see :mod:`p4q_lightning.methods`).
        quant_spec: the student's quantization spec (ignored by the float methods).
        prompt: the learned prompt's options.
        adapter: the adapter's options (``p4q`` only).
        teacher_text: the teacher's classifier, ``templates`` or ``prompt``.
        logit_scale: fixed cosine-logit scale; None uses the model's learned one.
        init_seed: seed of the prompt and adapter initialisation (the run seed wins if set).
        templates: prompt templates of the template classifier (each with one ``{}``).
        tip: Tip-Adapter's cache scalars (``tip_adapter``, ``tip_adapter_f``).
        lora: CLIP-LoRA's factors (``clip_lora``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        method: str = "p4q",
        quant_spec: QuantSpec | None = None,
        prompt: PromptArgs | None = None,
        adapter: AdapterArgs | None = None,
        teacher_text: str = "templates",
        logit_scale: float | None = None,
        init_seed: int = 0,
        templates: Sequence[str] | None = None,
        tip: TipArgs | None = None,
        lora: LoRAArgs | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.traits: MethodTraits = traits(method)
        self.prompt_args = prompt or PromptArgs()
        self.teacher_text = teacher_text
        self.fixed_logit_scale = logit_scale
        self.init_seed = init_seed
        quantized = self.traits.quantized
        self.quant_spec = (quant_spec or get_spec("w8a8")) if quantized else get_spec("fp")
        self.teacher, self.tokenizer = teacher, tokenizer
        self.lora_args = lora or LoRAArgs()
        self.student = quantize(teacher, self.quant_spec) if self.traits.quantized else teacher
        self._install_lora()
        self.tip_cache: TipCache | None = None
        if self.traits.tip_cache:
            tip = tip or TipArgs()
            self.tip_cache = TipCache(tip.alpha, tip.beta, trainable=self.traits.trains_cache)
        self.adapter: LowBitAdapter | None = None
        adapter = adapter or AdapterArgs()
        if self.traits.uses_adapter and adapter.enabled:
            # drawn from the run seed, not from wherever the global generator happens to be
            with seeding.seeded_global_rng(seeding.derived_seed("adapter", init_seed)):
                self.adapter = LowBitAdapter(
                    image_feature_dim(teacher),
                    adapter.reduction,
                    adapter.ratio,
                    adapter.bias,
                    self.quant_spec["adapter"],
                )
        self.prompt_learner: PromptLearner | None = None
        self.classnames: list[str] = []
        self.templates: list[str] = list(templates or DEFAULT_TEMPLATES)
        self.register_buffer("_teacher_text", None, persistent=False)
        self.register_buffer("_student_template_text", None, persistent=False)
        self.register_buffer("_anchor_text", None, persistent=False)
        self._eval_text: torch.Tensor | None = None
        self._teacher_checksum: float | None = None
        self.text_shard: tuple[int, int] = (0, 0)  # classes this rank encoded last (DDP)
        # the open_clip identity of the teacher, when built by :meth:`build` (for exports)
        self.model_name: str | None = None
        self.pretrained: str | None = None

    @classmethod
    def build(
        cls,
        model_name: str,
        pretrained: str | None,
        model_config: str | None = None,
        init_seed: int = 0,
        method: str = "p4q",
        quant: str | dict[str, Any] = "w8a8",
        quant_overrides: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> P4QClassifier:
        """Build the teacher from its open_clip identity, then the classifier around it."""
        teacher, tokenizer = build_teacher(model_name, pretrained, model_config, init_seed)
        spec = get_spec(quant, quant_overrides) if traits(method).quantized else None
        model = cls(teacher, tokenizer, method, spec, init_seed=init_seed, **kwargs)
        model.model_name, model.pretrained = model_name, pretrained
        return model

    # ------------------------------------------------------------------ classes
    def set_classes(
        self, classnames: Sequence[str], templates: Sequence[str] | None = None
    ) -> bool:
        """Set the class list (and templates), building or re-targeting the prompts.

        Returns whether the class list changed."""
        classnames = [str(c) for c in classnames]
        if templates:
            self.templates = list(templates)
        changed = classnames != self.classnames
        self.classnames = classnames
        if self.traits.trains_prompts:
            if self.prompt_learner is None:
                self.prompt_learner = PromptLearner.from_args(
                    classnames,
                    self.tokenizer,
                    TextTower(self.teacher).width,
                    self.prompt_args,
                    TextTower(self.teacher).token_embedding,
                    # the same on every rank and whenever setup() runs (DDP re-seeds per rank)
                    generator=seeding.generator("prompt", self.init_seed),
                ).to(self.device)
            elif changed:
                self.prompt_learner.set_classnames(classnames)
            if is_calibrated(self.student):
                self.prompt_learner.set_token_embedding(TextTower(self.student).token_embedding)
        if changed:
            self._teacher_text = None
            self._student_template_text = None
            self._anchor_text = None
        return changed

    @property
    def device(self) -> torch.device:
        return self.teacher.logit_scale.device

    def train(self, mode: bool = True) -> P4QClassifier:
        """The frozen CLIPs stay in eval mode (no dropout, fused attention) while the rest
        trains."""
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        for layer in lora_layers(self.student):  # LoRA's dropout acts while training
            layer.train(mode)
        return self

    # ------------------------------------------------------------------ calibration
    @property
    def needs_calibration(self) -> bool:
        """True while the student or the adapter has quantizers without ranges."""
        adapter_ready = self.adapter is None or self.adapter.is_calibrated
        return not (is_calibrated(self.student) and adapter_ready)

    def calibration_texts(
        self, max_texts: int | None = None, batch_size: int = 256
    ) -> list[torch.Tensor]:
        """Token batches of every class name in every template (the official calibration texts)."""
        texts = [t.format(c.replace("_", " ")) for c in self.classnames for t in self.templates]
        if max_texts is not None and len(texts) > max_texts:
            step = len(texts) / max_texts
            texts = [texts[int(i * step)] for i in range(max_texts)]
        return [self.tokenizer(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]

    def calibrate(
        self,
        images: Iterable[Any] | torch.Tensor,
        texts: Iterable[torch.Tensor] | torch.Tensor | None = None,
        progress: bool = True,
        adapter_batches: int = 8,
        batch_size: int | None = CALIB_BATCH_SIZE,
    ) -> dict[str, dict[str, float]]:
        """Calibrate the student (activation ranges, weights onto the grid), then initialise the
        adapter's input ranges from the student's features of the first ``adapter_batches``
        batches of the same images. The images run in batches of ``batch_size`` whatever their
        own batching (:func:`~p4q_lightning.quant.calibrate.fixed_batches`; None: as given),
        so the result does not depend on how ``images`` is batched."""
        # Normal tensors even when a Trainer calls this inside an inference-mode evaluation,
        # so the calibrated buffers remain usable by a later fit.
        with torch.inference_mode(False), torch.no_grad():
            return self._calibrate(images, texts, progress, adapter_batches, batch_size)

    def _calibrate(
        self,
        images: Iterable[Any] | torch.Tensor,
        texts: Iterable[torch.Tensor] | torch.Tensor | None,
        progress: bool,
        adapter_batches: int,
        batch_size: int | None,
    ) -> dict[str, dict[str, float]]:
        if (
            isinstance(images, Iterable)
            and not isinstance(images, torch.Tensor)
            and iter(images) is images
        ):
            images = list(images)  # a one-shot iterator is needed twice
        stats: dict[str, dict[str, float]] = {}
        if not is_calibrated(self.student):
            if texts is None:
                texts = self.calibration_texts()
            stats = calibrate_student(
                self.student, images=images, texts=texts, progress=progress, batch_size=batch_size
            )
        if self.prompt_learner is not None:
            self.prompt_learner.set_token_embedding(TextTower(self.student).token_embedding)
        if self.adapter is not None and not self.adapter.is_calibrated:
            first = itertools.islice(image_batches(images, batch_size), adapter_batches)
            self.adapter.calibrate(self.student_image_features(x) for x in first)
        self._anchor_text = None
        self.invalidate_text()
        return stats

    def rebuild_student(self) -> None:
        """A fresh, uncalibrated student from the float teacher (before loading other ranges)."""
        if self.traits.quantized:
            self.student = quantize(self.teacher, self.quant_spec)
            self._install_lora()
            self._anchor_text = None
            self.invalidate_text()

    def _install_lora(self) -> None:
        """CLIP-LoRA: wrap every attention's q/k/v projection of the student (both towers)."""
        if self.traits.lora:
            a = self.lora_args
            generator = seeding.generator("lora", self.init_seed)
            install_lora(self.student, a.rank, a.alpha, a.dropout, generator)
            for p in lora_parameters(self.student):
                p.requires_grad_(True)

    # ------------------------------------------------------------------ features and logits
    @property
    def logit_scale(self) -> float:
        """The cosine-logit scale: the fixed one if set, else the model's learned scale."""
        if self.fixed_logit_scale is not None:
            return float(self.fixed_logit_scale)
        return float(self.teacher.logit_scale.detach().exp())

    @torch.no_grad()
    def student_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's image embeddings [B, D] before the adapter (what the feature cache
        stores)."""
        return adapted_image_features(self.student, None, images.to(self.device))

    @torch.no_grad()
    def teacher_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The float teacher's image embeddings [B, D] (the distillation target)."""
        return adapted_image_features(self.teacher, None, images.to(self.device))

    def train_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's image embeddings for a training step: with the graph when the image
        tower trains (CLIP-LoRA), else as :meth:`student_image_features`."""
        if self.traits.image_tower_trains:
            return adapted_image_features(self.student, None, images.to(self.device))
        return self.student_image_features(images)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Student image features through the adapter (unchanged without one)."""
        return self.adapter(features) if self.adapter is not None else features

    def logits_from_features(
        self,
        features: torch.Tensor,
        text: torch.Tensor,
        tip_scalars: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """The method's logits [B, n_cls] from the student's (pre-adapter) image features and
        the class embeddings: adapter, cosine x scale, plus Tip-Adapter's cache logits (alpha
        times) once the cache is built, with the cache's alpha and beta or ``tip_scalars``."""
        logits = cosine_logits(self.adapt(features), text, self.logit_scale)
        cache = self.tip_cache
        if cache is not None and cache.is_built:
            if cache.values.shape[1] != logits.shape[1]:
                raise ValueError(
                    f"Tip-Adapter's cache holds {cache.values.shape[1]} classes but "
                    f"{logits.shape[1]} are scored: the cache can only score the classes it was "
                    "built on (not a base-to-novel new half or another dataset)"
                )
            alpha, beta = tip_scalars if tip_scalars is not None else (cache.alpha, cache.beta)
            logits = logits + alpha * cache(features, beta)
        return logits

    @torch.no_grad()
    def anchor_text_features(self) -> torch.Tensor:
        """KgCoOp's anchor: the hand-written prompt's (template classifier's) class embeddings
        through the student's text tower, cached until the classes or the student change."""
        if self._anchor_text is None:
            self._anchor_text = self.template_text_features(self.student)
        return self._anchor_text

    def template_text_features(self, model: nn.Module, grad: bool = False) -> torch.Tensor:
        """``model``'s template classifier [n_cls, D] (normalised) for the current classes
        (``grad``: with the graph, for CLIP-LoRA's training text tower)."""
        if not self.classnames:
            raise RuntimeError("no class names yet: call set_classes() or run through a Trainer")
        with torch.inference_mode(False):  # a cache, reused by training steps
            return template_text_features(
                model, self.tokenizer, self.classnames, self.templates, chunk_size=1024, grad=grad
            )

    def student_text_features(self, sharded: bool = False) -> torch.Tensor:
        """The student's normalised class embeddings [n_cls, D]: the learned prompt through the
        (quantized) text tower for p4q/coop, the template classifier for ptq/zeroshot.

        ``sharded``: under DDP, each rank encodes 1/W of the classes and they are gathered
        (a collective: only where every rank calls it, as in the training and eval steps)."""
        if self.traits.lora:  # the text tower trains: encode again, with the graph if enabled
            return self.template_text_features(self.student, grad=torch.is_grad_enabled())
        if not self.traits.trains_prompts and self.traits.quantized:
            if self._student_template_text is None:
                self._student_template_text = self.template_text_features(self.student)
            return self._student_template_text
        if not self.traits.trains_prompts:
            return self.teacher_text_features(sharded)
        learner = self._learner()
        p = self.prompt_args
        prompts, eot = learner(), learner.eot_index

        def encode(lo: int, hi: int) -> torch.Tensor:
            return encode_prompts(
                self.student,
                prompts[lo:hi],
                eot[lo:hi],
                p.chunk_size,
                p.checkpointing,
                shared_prefix=learner.shared_prefix_length,
            ).float()

        if not sharded:
            return F.normalize(encode(0, prompts.shape[0]), dim=-1)
        features, self.text_shard = gather_sharded(prompts.shape[0], encode)
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def teacher_text_features(self, sharded: bool = False) -> torch.Tensor:
        """The float teacher's normalised class embeddings [n_cls, D] (templates, cached once;
        or, with ``teacher_text: prompt``, the learned prompt through the float tower;
        ``sharded`` as in :meth:`student_text_features`)."""
        if self.teacher_text == "prompt" and self.prompt_learner is not None:
            learner = self.prompt_learner
            fixed = learner.embed_fixed(TextTower(self.teacher).token_embedding)
            prompts, eot = learner(fixed), learner.eot_index

            def encode(lo: int, hi: int) -> torch.Tensor:
                return encode_prompts(
                    self.teacher,
                    prompts[lo:hi],
                    eot[lo:hi],
                    self.prompt_args.chunk_size,
                    shared_prefix=learner.shared_prefix_length,
                ).float()

            n_cls = prompts.shape[0]
            features = gather_sharded(n_cls, encode)[0] if sharded else encode(0, n_cls)
            return F.normalize(features, dim=-1)
        if self._teacher_text is None:
            self._teacher_text = self.template_text_features(self.teacher)
        return self._teacher_text

    @property
    def has_teacher_template_text(self) -> bool:
        """Whether the teacher's template class embeddings are encoded (or were installed)."""
        return self._teacher_text is not None

    def use_teacher_template_text(self, features: torch.Tensor) -> None:
        """Install the teacher's template class embeddings computed elsewhere (the frozen-work
        store's copy), so they are not encoded again."""
        self._teacher_text = features.to(self.device)

    def student_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Student logits [B, n_cls] (quantized image tower → adapter → cosine × scale)."""
        text = self._eval_text if self._eval_text is not None else self.student_text_features()
        features = adapted_image_features(self.student, None, images.to(self.device))
        return self.logits_from_features(features, text)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float teacher logits [B, n_cls] with its classifier (``teacher_text``)."""
        return cosine_logits(
            self.teacher_image_features(images), self.teacher_text_features(), self.logit_scale
        )

    def freeze_eval_text(self, sharded: bool = False) -> None:
        """Encode the class embeddings once for an evaluation (until :meth:`invalidate_text`)."""
        with torch.no_grad():
            self._eval_text = self.student_text_features(sharded=sharded).detach()

    def invalidate_text(self) -> None:
        """Forget the cached class embeddings: call after the prompt, student or classes
        change (each optimiser step, a loaded checkpoint, calibration)."""
        self._eval_text = None
        self._student_template_text = None

    def teacher_fingerprint(self) -> float:
        """A checksum of the teacher's weights (computed once): a checkpoint records it so that
        loading it onto other CLIP weights is refused."""
        if self._teacher_checksum is None:
            self._teacher_checksum = weight_fingerprint(self.teacher)
        return self._teacher_checksum

    def cached_step_modules(self, distills: bool) -> tuple[list[nn.Module], list[nn.Module]]:
        """(what a training step from cached image features reads, the frozen towers it may
        leave out of memory): the student's text tower (without its token table: the prompt
        learner keeps its fixed tokens' embeddings), and with ``teacher_text: prompt`` and a
        distillation term the teacher's text tower with its table; the rest of both CLIPs is
        needed again only for evaluation and export (see :mod:`~p4q_lightning.training.residency`).
        """
        used = _text_tower_parts(self.student, with_table=False)
        if distills and self.teacher_text == "prompt":
            used += _text_tower_parts(self.teacher, with_table=True)
        return used, [self.teacher, self.student]

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that require grad (the prompt, the adapter, the LoRA factors
        and Tip-Adapter-F's keys may)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _learner(self) -> PromptLearner:
        if self.prompt_learner is None:
            raise RuntimeError("no class names yet: call set_classes() or run through a Trainer")
        return self.prompt_learner


def _text_tower_parts(model: nn.Module, with_table: bool) -> list[nn.Module | nn.Parameter]:
    """The modules and parameters of ``model``'s text tower (the image tower and the logit
    scale are not part of it; the token table only ``with_table``)."""
    root = TextTower(model).root
    skip = {"visual"} if with_table else {"visual", "token_embedding"}
    parts: list[nn.Module | nn.Parameter] = [
        m for name, m in root.named_children() if name not in skip
    ]
    parts += [p for name, p in root.named_parameters(recurse=False) if name != "logit_scale"]
    return parts
