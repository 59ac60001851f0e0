"""``FewShotDataModule``: CoOp few-shot splits of a suite dataset under ``$DATA``, a hub
dataset, a folder or the synthetic world, plus the run's extra test sets."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader, Dataset

from p4q_lightning.args import as_group
from p4q_lightning.data.cache import cache_dir
from p4q_lightning.data.datasets import MemoryDataset, SourceDataset, collate_skip_none, decode_all
from p4q_lightning.data.feature_serving import FeatureServing
from p4q_lightning.data.fewshot import resolve_indices
from p4q_lightning.data.hub import HubArgs
from p4q_lightning.data.kinds import DatasetRequest, dataset_kind
from p4q_lightning.data.run_split import RunSplit
from p4q_lightning.data.seeded import seeded_train_loader
from p4q_lightning.data.sources import ImageSource, SyntheticArgs
from p4q_lightning.data.subsample import SUBSAMPLES, Subsample
from p4q_lightning.data.test_sets import EvalSet, extra_test_sets, own_test_set
from p4q_lightning.data.transforms import eval_transform, train_transform
from p4q_lightning.distributed import global_rank
from p4q_lightning.synthetic_name import SYNTHETIC, synthetic_world_seed

log = logging.getLogger(__name__)


class FewShotDataModule(FeatureServing, L.LightningDataModule):
    """Few-shot train/val splits (CoOp protocol) and the full test split of one dataset.

    Serves cached image features for training when a module attaches a feature source
    (:class:`~p4q_lightning.data.feature_serving.FeatureServing`).

    Args:
        dataset: a CoOp suite name read from ``root`` (``imagenet``, ``caltech101``,
            ``oxford_pets``, ``stanford_cars``, ``oxford_flowers``, ``food101``,
            ``fgvc_aircraft``, ``sun397``, ``dtd``, ``eurosat``, ``ucf101``; test-only
            ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a``, ``imagenet_r``; CoOp's class
            names such as ``OxfordPets`` too); a Hugging Face hub id (``ILSVRC/imagenet-1k``,
            ``uoft-cs/cifar10``, ``uoft-cs/cifar100``) or builder (``imagefolder`` with
            ``data_dir``); a local image folder (ImageNet layout ``train/<wnid>/`` +
            ``val/<wnid>/``, or ``<class>/`` folders); a folder written by ``save_to_disk``; or
            ``synthetic[:<world_seed>]``.
        root: ``$DATA``, the folder holding the suite's dataset folders (CoOp's layout).
        shots: training images per class (CoOp: 1, 2, 4, 8, 16).
        seed: seed of the few-shot sampling (CoOp: 1, 2, 3).
        subsample_classes: ``all``, or ``base`` / ``new`` (CoCoOp's base-to-novel halves); a
            run on ``base`` is also tested on ``new``.
        test_datasets: more test sets for ``test`` (suite names, ids or folders): domain
            generalisation (``imagenet_v2``... scored with the classifier restricted to their
            classes) or cross-dataset transfer (another dataset's own class names).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (None: batch_size).
        num_workers: DataLoader worker processes.
        pin_memory: pin loader memory (None: on when CUDA is available).
        persistent_workers: keep loader workers alive between epochs.
        image_size: model input side (None: the model's, 224, or the synthetic world's 32).
        mean: normalisation mean (None: the model's preprocessing config, else OpenAI CLIP's).
        std: normalisation std (None: the model's preprocessing config, else OpenAI CLIP's).
        interpolation: resize interpolation (None: the model's, else ``bicubic``).
        crop_scale: RandomResizedCrop scale of CoOp's train augmentation (None: (0.08, 1), or
            (0.5, 1) for the 32-pixel synthetic world, whose objects a tiny crop would miss).
        hflip: random horizontal flips in the train augmentation.
        train_augment: augment training images (False: the eval transform).
        calib_images: how many seeded train-split images ``calibration_dataloader`` serves.
        calib_batch_size: images per calibration batch (the official 128), whatever the
            training batch size or the number of processes, so the calibrated student is the
            same on 1 or N GPUs (the last batch is the last ``calib_batch_size`` images).
        split_dir: where split files and folder indexes go (default ``$P4Q_CACHE_DIR/splits``).
        skip_corrupt: skip unreadable images (counted and logged) instead of failing.
        expected_num_classes: fail early when the dataset has a different number of classes.
        classnames: override the dataset's class names (same number of classes).
        templates: override the dataset's prompt templates (each with one ``{}``).
        in_memory: decode the few-shot train/val images once and keep them in memory.
        cache_shorter_side: in-memory images are downscaled to this shorter side (None:
            ``image_size * 8 / 7``, i.e. 256 for 224) to bound memory.
        hub: Hugging Face ``datasets`` options (data_dir, config, columns, splits, cache_dir).
        synthetic: the generated demo world (world seed, images per class).
    """

    def __init__(
        self,
        dataset: str | None = SYNTHETIC,
        root: str | None = None,
        shots: int = 16,
        seed: int = 1,
        subsample_classes: Subsample = "all",
        test_datasets: list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_scale: tuple[float, float] | None = None,
        hflip: bool = True,
        train_augment: bool = True,
        calib_images: int = 1024,
        calib_batch_size: int = 128,
        split_dir: str | None = None,
        skip_corrupt: bool = False,
        expected_num_classes: int | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        in_memory: bool = True,
        cache_shorter_side: int | None = None,
        hub: HubArgs = HubArgs(),
        synthetic: SyntheticArgs = SyntheticArgs(),
    ):
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if shots < 1:
            raise ValueError(f"shots={shots}: use a positive number of images per class")
        if batch_size < 1 or calib_batch_size < 1 or calib_images < 0:
            raise ValueError(
                "batch_size and calib_batch_size must be positive and calib_images non-negative"
            )
        if not dataset:
            raise ValueError(
                "data.init_args.dataset is not set: pass --data.init_args.dataset <name> (e.g. "
                "oxford_pets with --data.init_args.root $DATA, a hub id, a folder or synthetic)"
            )
        if subsample_classes not in SUBSAMPLES:
            raise ValueError(
                f"subsample_classes={subsample_classes!r}: use one of {', '.join(SUBSAMPLES)}"
            )
        self.hub_args = as_group(HubArgs, hub, "data.hub")
        self.synthetic_args = as_group(SyntheticArgs, synthetic, "data.synthetic")
        # plain values only: checkpoints are read back with torch.load(weights_only=True)
        arguments.update(
            hub=dataclasses.asdict(self.hub_args), synthetic=dataclasses.asdict(self.synthetic_args)
        )
        self.save_hyperparameters(arguments)
        self.dataset = dataset
        self.shots, self.seed = shots, seed
        world_seed = synthetic_world_seed(dataset, self.synthetic_args.world_seed)  # "x" fails now
        self.is_synthetic = world_seed is not None
        self.world_seed = self.synthetic_args.world_seed if world_seed is None else world_seed
        self.split_dir = split_dir
        request = self.request(dataset, self.hub_args)
        defaults = dataset_kind(request).defaults  # the kind's own (e.g. the demo world's)
        self.image_size = image_size or defaults.image_size
        # the command line fills these from the model's preprocessing config (P4QCLI)
        self.mean = tuple(mean) if mean else OPENAI_DATASET_MEAN
        self.std = tuple(std) if std else OPENAI_DATASET_STD
        self.interpolation = interpolation or "bicubic"
        self.crop_scale = tuple(crop_scale) if crop_scale else defaults.crop_scale
        self.classnames: list[str] = []
        self.templates: list[str] = []
        self.num_classes = 0
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.extra_test: list[tuple[EvalSet, Dataset]] | None = None
        self.skipped: list[str] = []
        self.run_split = RunSplit(request, shots, seed, subsample_classes, self._split_root())

    # ------------------------------------------------------------------ sources and splits
    def request(self, dataset: str, hub: HubArgs | None = None) -> DatasetRequest:
        """How ``dataset`` is opened here (root, world and folder-index options)."""
        return DatasetRequest(
            dataset,
            self.hparams.root,
            hub or HubArgs(cache_dir=self.hub_args.cache_dir),
            self.synthetic_args,
            self._split_root() / "index",
        )

    def _split_root(self) -> Path:
        return Path(self.split_dir).expanduser() if self.split_dir else cache_dir() / "splits"

    @property
    def full_source(self) -> ImageSource:
        """The opened dataset with all its classes (opened once, on first use)."""
        return self.run_split.full

    @property
    def source(self) -> ImageSource:
        """The dataset the run uses: all classes, or CoCoOp's base or new half."""
        if not self.classnames:
            self._set_classes(self.run_split.source(write=global_rank() == 0))
        return self.run_split.source(write=False)

    @property
    def split(self) -> dict[str, Any] | None:
        """The few-shot split (``train``/``val`` item keys), once loaded."""
        run = self.run_split
        return run.load(write=False) if run.loaded else None

    @property
    def split_file(self) -> Path:
        """Path of the JSON split file for (dataset, shots, seed)."""
        return self.run_split.path

    @property
    def test_only(self) -> bool:
        """A dataset without training images (ImageNetV2, -Sketch, -A, -R)."""
        return self.run_split.test_only

    def _set_classes(self, source: ImageSource) -> None:
        hp = self.hparams
        names = list(hp.classnames) if hp.classnames else list(source.classnames)
        if len(names) != len(source.classnames):
            raise ValueError(
                f"classnames has {len(names)} entries but {source.name} has "
                f"{len(source.classnames)} classes"
            )
        if hp.expected_num_classes is not None and len(names) != hp.expected_num_classes:
            raise ValueError(
                f"{source.name} has {len(names)} classes but expected_num_classes="
                f"{hp.expected_num_classes}: check the dataset path/split (e.g. a partial copy "
                "or the wrong folder level), or fix expected_num_classes"
            )
        templates = list(hp.templates) if hp.templates else list(source.templates)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates must contain exactly one '{{}}': {bad[:3]}")
        self.classnames, self.templates, self.num_classes = names, templates, len(names)

    def prepare_data(self) -> None:
        """Download/prepare the dataset and write the split file once (local rank 0)."""
        self.run_split.write()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``: few-shot train (fit), few-shot val (fit/validate),
        the full evaluation split (test/predict); None builds all."""
        run, hp = self.run_split, self.hparams
        if run.test_only and stage in (None, "fit", "validate"):
            run.refuse_test_only()
        if not run.test_only:
            run.load(write=global_rank() == 0)
        source = self.source
        if self.extra_test is None:  # checked at fit too: a wrong test set fails before training
            self.extra_test = self._extra_test_sets()
        ev = eval_transform(self.image_size, self.mean, self.std, self.interpolation)
        if stage in (None, "fit") and self.train_dataset is None:
            tr = train_transform(
                self.image_size,
                self.mean,
                self.std,
                self.crop_scale,
                hp.hflip,
                hp.train_augment,
                self.interpolation,
            )
            self.train_dataset = self._few_shot_dataset("train", run.drawn("train"), tr)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            val_from = run.load(write=False)["val_from"]
            self.val_dataset = self._few_shot_dataset(val_from, run.drawn("val"), ev)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            split, indices = run.test_items()
            if not indices:
                raise ValueError(
                    f"{source.name} has no test split and the few-shot split (shots={hp.shots} "
                    "per class, plus validation) uses up every training image, so the test set "
                    "would have 0 images; lower data.shots or use a dataset with a test split"
                )
            self.test_dataset = SourceDataset(
                source, split, indices, ev, skip_corrupt=hp.skip_corrupt
            )

    def _few_shot_dataset(self, split: str, keys: list[Any], transform) -> Dataset:
        source, hp = self.source, self.hparams
        indices = resolve_indices(source, split, keys)
        if not hp.in_memory:
            return SourceDataset(source, split, indices, transform, skip_corrupt=hp.skip_corrupt)
        side = hp.cache_shorter_side or (self.image_size * 8 + 6) // 7
        images, labels, skipped = decode_all(
            source, split, indices, hp.skip_corrupt, side, threads=max(1, hp.num_workers)
        )
        self.skipped.extend(skipped)
        return MemoryDataset(images, labels, transform)

    # ------------------------------------------------------------------ more test sets
    @property
    def test_sets(self) -> list[EvalSet]:
        """What ``test`` evaluates, in loader order: the run's own test split, then the
        ``new`` half (base-to-novel runs) and each of ``test_datasets``."""
        return [own_test_set(self), *(t for t, _ in self.extra_test or [])]

    def _extra_test_sets(self) -> list[tuple[EvalSet, Dataset]]:
        hp = self.hparams
        ev = eval_transform(self.image_size, self.mean, self.std, self.interpolation)
        sets = extra_test_sets(self, hp.subsample_classes, list(hp.test_datasets or []))
        return [
            (t, SourceDataset(src, "test", range(len(src.labels("test"))), ev, hp.skip_corrupt))
            for t, src in sets
        ]

    # ------------------------------------------------------------------ loaders
    def _loader(
        self, dataset: Dataset | None, shuffle: bool, batch_size: int | None = None
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() for this stage before asking for its dataloader")
        hp = self.hparams
        workers = hp.num_workers
        options = dict(
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory,
            persistent_workers=hp.persistent_workers and workers > 0,
            collate_fn=collate_skip_none,
        )
        if shuffle:  # training: order and crops from (seed, epoch, index), resume- and DDP-exact
            return seeded_train_loader(
                dataset, batch_size or hp.batch_size, self.trainer, self.seed, **options
            )
        return DataLoader(dataset, batch_size=batch_size or hp.batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self.serve(self._loader(self.train_dataset, shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The run's own test split, or a list of loaders in :attr:`test_sets` order when the
        run has more test sets."""
        own = self._loader(self.test_dataset, False, self.hparams.eval_batch_size)
        if not self.extra_test:
            return own
        batch = self.hparams.eval_batch_size
        return [own, *(self._loader(ds, False, batch) for _, ds in self.extra_test)]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, self.hparams.eval_batch_size)

    def calibration_dataloader(self, num_images: int | None = None) -> DataLoader:
        """``calib_images`` train-split images for PTQ calibration: seeded, eval transform,
        every other image flipped (labels included but not needed)."""
        if self.test_only:
            self.run_split.refuse_test_only()
        source, hp = self.source, self.hparams
        n_total = len(source.labels("train"))
        n = min(hp.calib_images if num_images is None else num_images, n_total)
        indices = sorted(random.Random(f"calib-{self.seed}").sample(range(n_total), n))
        transform = eval_transform(self.image_size, self.mean, self.std, self.interpolation)
        ds = SourceDataset(
            source, "train", indices, transform, skip_corrupt=hp.skip_corrupt, flip_odd=hp.hflip
        )
        hp_workers = hp.num_workers
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        return DataLoader(
            ds,
            batch_size=hp.calib_batch_size,
            shuffle=False,
            num_workers=hp_workers,
            pin_memory=pin,
            collate_fn=collate_skip_none,
        )
