"""Feeding training steps from cached image features instead of images.

The module attaches a :class:`TrainFeatureSource` to the datamodule in ``setup("fit")`` (a
datamodule with :class:`~p4q_lightning.data.feature_serving.FeatureServing`); the datamodule's
``train_dataloader`` then hands its image loader to :meth:`TrainFeatureSource.dataloader` and
returns a loader over the cached features instead. That loader is sized at once (Lightning asks
for its length while the optimisers are configured, before calibration); its images are encoded
for ``features.views`` augmented views (see :mod:`feature_cache`) in
:meth:`~TrainFeatureSource.fill` at the start of training, after calibration. Lightning still
owns the loader (it sets the sampler's epoch). Only documented Lightning hooks and properties
are used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from p4q_lightning import seeding
from p4q_lightning.data.seeded import ResumableLoader, run_sampler
from p4q_lightning.training.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    build_feature_cache,
    dataset_fingerprint,
    load_or_build,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from p4q_lightning.args import FeatureArgs
    from p4q_lightning.model.classifier import P4QClassifier

log = logging.getLogger(__name__)


def effective_views(views: int, max_epochs: int | None) -> int:
    """The feature views a fit uses: each image is seen ``max_epochs`` times, so views beyond
    that would be encoded and never drawn."""
    if max_epochs is not None and 0 < max_epochs < views:
        return max_epochs
    return views


class TrainFeatureSource:
    """Owns the feature cache of one fit and the loader over it.

    Its inputs are explicit: the :class:`~p4q_lightning.model.classifier.P4QClassifier`
    (features, calibration state, student, method, spec, device), the ``features`` options,
    whether the teacher's features are needed (``distills``), the model identity that keys the
    cache (``model_name``, ``pretrained``, ``model_config``, ``init_seed``), and the fitting
    trainer's documented properties (``datamodule``, ``current_epoch``, rank and world size,
    ``is_global_zero``, ``progress_bar_callback``).
    """

    def __init__(
        self,
        trainer: Trainer,
        classifier: P4QClassifier,
        features: FeatureArgs,
        views: int,
        distills: bool,
        identity: Mapping[str, Any],
    ) -> None:
        self.trainer = trainer
        self.classifier = classifier
        self.features = features
        self.views = views  # decided once, in attach
        self.distills = distills
        self.identity = dict(identity)
        self.datamodule = trainer.datamodule
        self.cache: FeatureCache | None = None
        self.dataset: CachedFeatureDataset | None = None
        self.images: DataLoader | None = None  # the datamodule's image loader: what is encoded

    @classmethod
    def attach(
        cls,
        trainer: Trainer,
        classifier: P4QClassifier,
        features: FeatureArgs,
        distills: bool,
        identity: Mapping[str, Any],
    ) -> TrainFeatureSource | None:
        """Have ``trainer``'s datamodule serve this fit's cached features (None when
        ``features.views`` is 0, or, with one warning, when the datamodule cannot serve them).

        The number of views is decided here, once: ``features.views``, lowered to
        ``trainer.max_epochs`` when that is smaller (logged)."""
        dm = trainer.datamodule
        serve = getattr(dm, "serve_features", None)
        views = int(features.views)
        if classifier.traits.image_tower_trains:
            views = 0  # the student's image features change with training (CLIP-LoRA)
        if views == 0:
            if callable(serve):
                serve(None)  # nothing left over from an earlier fit of another module
            return None
        if not callable(serve):
            if trainer.is_global_zero:
                log.warning(
                    "features.views=%d, but the training data comes from %s, which cannot serve "
                    "cached image features (no serve_features method): training with live "
                    "augmentation, both image towers on every step. Use a datamodule with "
                    "p4q_lightning.data.FeatureServing (e.g. FewShotDataModule), or set "
                    "model.features.views=0",
                    views,
                    "plain dataloaders" if dm is None else type(dm).__name__,
                )
            return None
        # Tip-Adapter averages every view into its cache keys, whatever the epochs
        capped = classifier.traits.trains and not classifier.traits.tip_cache
        used = effective_views(views, trainer.max_epochs) if capped else views
        if used != views and trainer.is_global_zero:
            log.info(
                "features.views=%d, but the fit runs max_epochs=%d and draws one view per epoch: "
                "caching %d views",
                views,
                trainer.max_epochs,
                used,
            )
        source = cls(trainer, classifier, features, used, distills, identity)
        serve(source)
        return source

    def detach(self) -> None:
        """Give the datamodule its image loader back (at the end of the fit)."""
        if getattr(self.datamodule, "feature_source", None) is self:
            self.datamodule.serve_features(None)

    def set_epoch(self, epoch: int) -> None:
        if self.dataset is not None:
            self.dataset.epoch = epoch

    def dataloader(self, images: DataLoader) -> DataLoader:
        """The loader over the cached features of ``images``' dataset, sized now and filled
        by :meth:`fill`."""
        if not isinstance(images, DataLoader):
            raise TypeError(
                "feature caching needs the training data as one torch DataLoader, got "
                f"{type(images).__name__}; set model.features.views=0 for live augmentation"
            )
        self.images = images
        if self.dataset is None:
            self.dataset = CachedFeatureDataset(self.cache, length=_length(images))
            self.dataset.epoch = self.trainer.current_epoch
        # The order is a function of (seed, epoch, rank) alone, as for the image loader: a
        # resumed run shuffles exactly as the uninterrupted one, and N ranks equal one process.
        sampler = run_sampler(
            self.dataset,
            self.trainer,
            int(self.identity["init_seed"]),
            drop_last=images.drop_last,
        )
        sampler.set_epoch(self.trainer.current_epoch)
        return ResumableLoader(
            self.dataset,
            batch_size=images.batch_size or 32,
            sampler=sampler,
            drop_last=images.drop_last,
            num_workers=0,  # in-memory tensors; the per-epoch view choice lives in this process
            collate_fn=self.dataset.collate,
        )

    def fill(self) -> None:
        """Encode (or load) the features: at the start of training, after calibration and
        before the first batch; every rank calls it at the same point (the build is
        collective under DDP)."""
        if self.dataset is None or self.images is None:
            log.warning(
                "the datamodule never asked for the cached-feature loader (its train_dataloader "
                "does not return FeatureServing.serve(...)): no features were cached"
            )
            return
        if self.cache is None:
            self.cache = self._build(self.images)
            self.dataset.fill(self.cache)
        self.dataset.epoch = self.trainer.current_epoch

    def _build(self, reference: DataLoader) -> FeatureCache:
        model, trainer = self.classifier, self.trainer
        if model.needs_calibration:
            raise RuntimeError(
                "the student must be calibrated before its features are cached: keep the "
                "CalibrationCallback (added by default) or call "
                "module.classifier.calibrate(...) before fit"
            )
        encoders = {"student": model.student_image_features}
        if self.distills:
            encoders["teacher"] = model.teacher_image_features
        seed = seeding.run_seed(0)  # seed_everything's; the same on every rank
        views, device = self.views, model.device

        def build() -> FeatureCache:
            log.info(
                "caching image features of %d training images x %d views",
                len(reference.dataset),
                views,
            )
            return build_feature_cache(
                reference.dataset,
                encoders,
                views,
                batch_size=reference.batch_size or 64,
                num_workers=reference.num_workers,
                seed=seed,
                device=device,
                collate_fn=reference.collate_fn,
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            )

        key = self._key(reference, seed, views)
        return load_or_build(self.features.cache_dir, key, build, device=device)

    def _key(self, reference: DataLoader, seed: int, views: int) -> str:
        hp, model = self.identity, self.classifier
        quant_state = hashlib.sha1()
        for name, buf in sorted(model.student.state_dict().items()):
            if name.endswith(("scale", "zero_point", "range_min", "range_max")):
                quant_state.update(name.encode())
                quant_state.update(buf.detach().cpu().numpy().tobytes())
        identity = {
            "model": [hp["model_name"], hp["pretrained"], hp["model_config"], hp["init_seed"]],
            "method": model.method,
            "spec": model.quant_spec.to_dict(),
            "quantizers": quant_state.hexdigest(),
            "teacher": "teacher" if self.distills else "",
            "views": views,
            "seed": seed,
        }
        extra = {"identity": json.dumps(identity, sort_keys=True, default=str)}
        dm = self.datamodule
        if dm is not None and getattr(dm, "hparams", None):
            extra["datamodule"] = json.dumps(dict(dm.hparams), sort_keys=True, default=str)
        return dataset_fingerprint(reference.dataset, extra)


def _length(images: DataLoader) -> int:
    """How many images the loader's dataset holds (the cached dataset's length)."""
    try:
        return len(images.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "feature caching needs a training dataset with a length, got "
            f"{type(images.dataset).__name__}; set model.features.views=0 for live augmentation"
        ) from None
