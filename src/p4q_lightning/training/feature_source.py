"""Feeding training steps from cached image features instead of images.

The datamodule's training loader is asked once for its dataset, batch size and workers; its
images are encoded for ``feature_views`` augmented views (see :mod:`feature_cache`); the fit
loop then iterates a loader over the cached features. Lightning still owns that loader (it
adds the distributed sampler under DDP).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from torch.utils.data import DataLoader, DistributedSampler

from p4q_lightning.training import seeding
from p4q_lightning.training.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    build_feature_cache,
    dataset_fingerprint,
    load_or_build,
)

if TYPE_CHECKING:  # a P4QModule; training/ does not import module.py (no import cycle)
    from lightning.pytorch import LightningModule

log = logging.getLogger(__name__)


class _CachedSource(_DataLoaderSource):
    """The fit loop's data source, answering with the cached-feature loader."""

    def __init__(self, original: _DataLoaderSource, feature_source: TrainFeatureSource) -> None:
        super().__init__(original.instance, original.name)
        self.original = original
        self.feature_source = feature_source

    def dataloader(self) -> Any:
        return self.feature_source.dataloader(self.original)


class TrainFeatureSource:
    """Owns the feature cache of one fit and the loader over it."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.cache: FeatureCache | None = None
        self.dataset: CachedFeatureDataset | None = None

    @classmethod
    def install(cls, module: LightningModule) -> TrainFeatureSource | None:
        """Route the trainer's training data through the cache (None if not possible)."""
        fit_loop = module.trainer.fit_loop
        original = getattr(fit_loop, "_data_source", None)
        if not isinstance(original, _DataLoaderSource):
            log.warning(
                "this Lightning version has no known training data source; using live augmentation"
            )
            return None
        if isinstance(original, _CachedSource):
            original = original.original
        source = cls(module)
        fit_loop._data_source = _CachedSource(original, source)
        return source

    def set_epoch(self, epoch: int) -> None:
        if self.dataset is not None:
            self.dataset.epoch = epoch

    def dataloader(self, original: _DataLoaderSource) -> DataLoader:
        reference = original.dataloader()
        if not isinstance(reference, DataLoader):
            raise TypeError(
                "feature caching needs the training data as one torch DataLoader, got "
                f"{type(reference).__name__}; set model.features.views=0 for live augmentation"
            )
        if self.cache is None:
            self.cache = self._build(reference)
        self.dataset = CachedFeatureDataset(self.cache)
        self.dataset.epoch = self.module.current_epoch
        trainer = self.module.trainer
        # The order is a function of (seed, epoch, rank) alone: Lightning calls set_epoch before
        # every epoch, so a resumed run shuffles exactly as the uninterrupted one, and the
        # global batch of N ranks x B is the same set of samples as one process with N x B.
        sampler = DistributedSampler(
            self.dataset,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=True,
            seed=seeding.derived_seed("shuffle", int(self.module.hparams.init_seed)),
            drop_last=reference.drop_last,
        )
        sampler.set_epoch(self.module.current_epoch)
        return DataLoader(
            self.dataset,
            batch_size=reference.batch_size or 32,
            sampler=sampler,
            drop_last=reference.drop_last,
            num_workers=0,  # in-memory tensors; the per-epoch view choice lives in this process
        )

    def _build(self, reference: DataLoader) -> FeatureCache:
        module = self.module
        model = module.classifier
        if model.needs_calibration:
            raise RuntimeError(
                "the student must be calibrated before its features are cached: keep the "
                "CalibrationCallback (added by default) or call "
                "module.classifier.calibrate(...) before fit"
            )
        encoders = {"student": model.student_image_features}
        if module.distills:
            encoders["teacher"] = model.teacher_image_features
        seed = seeding.run_seed(0)  # seed_everything's; the same on every rank
        views = int(module.features_args.views)
        max_epochs = module.trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs < views:
            views = max_epochs  # each image is seen max_epochs times: more views go unused

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
                device=module.device,
                collate_fn=reference.collate_fn,
                progress=module.trainer.is_global_zero
                and module.trainer.progress_bar_callback is not None,
            )

        key = self._key(reference, seed, views)
        return load_or_build(module.features_args.cache_dir, key, build, device=module.device)

    def _key(self, reference: DataLoader, seed: int, views: int) -> str:
        module = self.module
        hp, model = module.hparams, module.classifier
        quant_state = hashlib.sha1()
        for name, buf in sorted(model.student.state_dict().items()):
            if name.endswith(("scale", "zero_point", "range_min", "range_max")):
                quant_state.update(name.encode())
                quant_state.update(buf.detach().cpu().numpy().tobytes())
        identity = {
            "model": [hp.model_name, hp.pretrained, hp.model_config, hp.init_seed],
            "method": model.method,
            "spec": model.quant_spec.to_dict(),
            "quantizers": quant_state.hexdigest(),
            "teacher": "teacher" if module.distills else "",
            "views": views,
            "seed": seed,
        }
        extra = {"identity": json.dumps(identity, sort_keys=True, default=str)}
        dm = getattr(module.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "hparams", None):
            extra["datamodule"] = json.dumps(dict(dm.hparams), sort_keys=True, default=str)
        return dataset_fingerprint(reference.dataset, extra)
