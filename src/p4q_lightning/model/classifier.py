"""The P4Q classifier maths on top of the frozen CLIPs: calibration, image and text features,
logits. A mixin of :class:`~p4q_lightning.module.P4QModule`, kept apart from the Lightning glue.

It expects the attributes the module sets: ``teacher``, ``student``, ``adapter``,
``prompt_learner``, ``tokenizer``, ``classnames``, ``templates``, ``method``, ``hparams`` and
the ``_teacher_text`` / ``_student_template_text`` buffers and ``_eval_text``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p4q_lightning.losses import cosine_logits
from p4q_lightning.methods import traits
from p4q_lightning.model.build import weight_fingerprint
from p4q_lightning.model.text_encoder import TextTower, encode_prompts, template_text_features
from p4q_lightning.model.text_sharding import gather_sharded
from p4q_lightning.quant import calibrate as calibrate_student
from p4q_lightning.quant import is_calibrated


class P4QClassifierMixin:
    """Calibration, features and logits of the student and the teacher."""

    teacher: nn.Module
    student: nn.Module
    adapter: nn.Module | None
    prompt_learner: Any
    tokenizer: Any
    classnames: list[str]
    templates: list[str]
    method: str
    hparams: Any
    device: torch.device
    _teacher_text: torch.Tensor | None
    _student_template_text: torch.Tensor | None
    _eval_text: torch.Tensor | None
    text_shard: tuple[int, int] = (0, 0)  # the classes this rank encoded last (DDP sharding)

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
    ) -> dict[str, dict[str, float]]:
        """Calibrate the student (activation ranges, weights onto the grid), then initialise the
        adapter's input ranges from the student's features of the same images."""
        # Normal tensors even when a Trainer calls this inside an inference-mode evaluation,
        # so the calibrated buffers remain usable by a later fit.
        with torch.inference_mode(False), torch.no_grad():
            return self._calibrate(images, texts, progress, adapter_batches)

    def _calibrate(
        self,
        images: Iterable[Any] | torch.Tensor,
        texts: Iterable[torch.Tensor] | torch.Tensor | None,
        progress: bool,
        adapter_batches: int,
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
            stats = calibrate_student(self.student, images=images, texts=texts, progress=progress)
        if self.prompt_learner is not None:
            self.prompt_learner.set_token_embedding(TextTower(self.student).token_embedding)
        if self.adapter is not None and not self.adapter.is_calibrated:
            self.adapter.calibrate(
                self.student_image_features(x) for x in _take(images, adapter_batches)
            )
        self.invalidate_text()
        return stats

    # ------------------------------------------------------------------ features and logits
    @property
    def logit_scale(self) -> float:
        """The cosine-logit scale: ``logit_scale`` if set, else the model's learned scale."""
        if self.hparams.logit_scale is not None:
            return float(self.hparams.logit_scale)
        return float(self.teacher.logit_scale.detach().exp())

    @torch.no_grad()
    def student_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's image embeddings [B, D] before the adapter (what the feature cache
        stores)."""
        return self.student.encode_image(images.to(self.device)).float()

    @torch.no_grad()
    def teacher_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The float teacher's image embeddings [B, D] (the distillation target)."""
        return self.teacher.encode_image(images.to(self.device)).float()

    def _adapt(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter(features) if self.adapter is not None else features

    def student_text_features(self, sharded: bool = False) -> torch.Tensor:
        """The student's normalised class embeddings [n_cls, D]: the learned prompt through the
        (quantized) text tower for p4q/coop, the template classifier for ptq/zeroshot.

        ``sharded``: under DDP, each rank encodes 1/W of the classes and they are gathered
        (a collective: only where every rank calls it, as in the training and eval steps)."""
        method = traits(self.method)
        if not method.trains_prompts and method.quantized:
            if self._student_template_text is None:
                self._student_template_text = self._templates(self.student)
            return self._student_template_text
        if not method.trains_prompts:
            return self.teacher_text_features(sharded)
        assert self.prompt_learner is not None, "set_classes() first"
        hp = self.hparams
        prompts, eot = self.prompt_learner(), self.prompt_learner.eot_index

        def encode(lo: int, hi: int) -> torch.Tensor:
            return encode_prompts(
                self.student,
                prompts[lo:hi],
                eot[lo:hi],
                hp.text_chunk_size,
                hp.text_checkpointing,
                shared_prefix=self.prompt_learner.shared_prefix_length,
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
        if self.hparams.teacher_text == "prompt" and self.prompt_learner is not None:
            fixed = self.prompt_learner.embed_fixed(TextTower(self.teacher).token_embedding)
            prompts, eot = self.prompt_learner(fixed), self.prompt_learner.eot_index

            def encode(lo: int, hi: int) -> torch.Tensor:
                return encode_prompts(
                    self.teacher,
                    prompts[lo:hi],
                    eot[lo:hi],
                    self.hparams.text_chunk_size,
                    shared_prefix=self.prompt_learner.shared_prefix_length,
                ).float()

            n_cls = prompts.shape[0]
            features = gather_sharded(n_cls, encode)[0] if sharded else encode(0, n_cls)
            return F.normalize(features, dim=-1)
        if self._teacher_text is None:
            self._teacher_text = self._templates(self.teacher)
        return self._teacher_text

    def _templates(self, model: nn.Module) -> torch.Tensor:
        if not self.classnames:
            raise RuntimeError("no class names yet: call set_classes() or run through a Trainer")
        with torch.inference_mode(False):  # a cache, reused by training steps
            return template_text_features(
                model, self.tokenizer, self.classnames, self.templates, chunk_size=1024
            )

    def student_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Student logits [B, n_cls] (quantized image tower → adapter → cosine × scale)."""
        text = self._eval_text if self._eval_text is not None else self.student_text_features()
        features = self._adapt(self.student_image_features(images))
        return cosine_logits(features, text, self.logit_scale)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float teacher logits [B, n_cls] with its classifier (``teacher_text``)."""
        return cosine_logits(
            self.teacher_image_features(images), self.teacher_text_features(), self.logit_scale
        )

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


def _take(images: Iterable[Any] | torch.Tensor, n: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield images
        return
    for i, batch in enumerate(images):
        if i >= n:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch
