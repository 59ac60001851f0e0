"""The datamodule serves cached features while a P4Q fit runs (attached in setup, filled after
calibration, detached at the end); without a datamodule that can serve them, live augmentation
with one warning."""

from __future__ import annotations

import logging
import warnings

import pytest
from lightning.pytorch import Callback, LightningDataModule, seed_everything
from torch.utils.data import DataLoader

import tiny_world
from p4q_lightning.module import P4QModule
from p4q_lightning.training.feature_source import effective_views

warnings.filterwarnings("ignore", ".*does not have many workers.*")

NO_SERVING = "cannot serve cached image features"


class Batches(Callback):
    """What each training step received, and whether the datamodule served this fit's source."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.served: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.kinds.append("features" if isinstance(batch, dict) else "images")
        source = getattr(trainer.datamodule, "feature_source", None)
        self.served.append(source is not None and source is pl_module._train_source)


def module(world, **kw) -> P4QModule:
    args = {"quant_overrides": tiny_world.MINMAX, "feature_views": 2, **kw}
    return P4QModule(**tiny_world.module_args(world, **args))


def fit(model: P4QModule, tmp_path, *args, **kw) -> Batches:
    batches = Batches()
    tiny_world.trainer(tmp_path, limit_val_batches=0, callbacks=[batches]).fit(model, *args, **kw)
    return batches


def test_the_datamodule_serves_cached_features_during_the_fit_only(world, tmp_path, caplog):
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    first = module(world)
    with caplog.at_level(logging.INFO, logger="p4q_lightning.training.feature_source"):
        batches = fit(first, tmp_path, dm)
    assert batches.kinds == ["features"] * 4 and all(batches.served)
    # feature_views=2, capped by max_epochs=1 where the source is attached, and said so once
    assert first._train_source.views == first._train_source.cache.views == 1
    lowered = [r.getMessage() for r in caplog.records if "caching 1 views" in r.getMessage()]
    assert len(lowered) == 1 and "features.views=2" in lowered[0]
    # detached at the end of the fit: the same datamodule gives images to whoever asks next
    assert dm.feature_source is None
    assert isinstance(next(iter(dm.train_dataloader())), list)
    # a second fit attaches its own source again
    second = module(world)
    assert fit(second, tmp_path, dm).kinds == ["features"] * 4
    assert second._train_source is not first._train_source and dm.feature_source is None


def test_the_views_a_fit_uses():
    assert effective_views(8, max_epochs=3) == 3  # one view drawn per epoch
    assert effective_views(2, max_epochs=10) == 2
    assert effective_views(4, max_epochs=None) == effective_views(4, max_epochs=-1) == 4


def test_feature_views_0_trains_on_images(world, tmp_path):
    seed_everything(0)
    model = module(world, feature_views=0)
    batches = fit(model, tmp_path, tiny_world.TinyDataModule(str(world["data"])))
    assert batches.kinds == ["images"] * 4 and model._train_source is None


class OtherDataModule(LightningDataModule):
    """Someone else's datamodule: the tiny world's images, no ``serve_features``."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.inner = tiny_world.TinyDataModule(root)

    def setup(self, stage: str) -> None:
        self.inner.setup(stage)
        self.classnames, self.templates = self.inner.classnames, self.inner.templates

    def train_dataloader(self) -> DataLoader:
        return self.inner.train_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        return self.inner.calibration_dataloader()


def _calibrated(world) -> tuple[P4QModule, tiny_world.TinyDataModule]:
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup("fit")
    model = module(world, classnames=dm.classnames)
    model.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    return model, dm


@pytest.mark.parametrize("data", ["plain dataloaders", "OtherDataModule"])
def test_without_a_serving_datamodule_one_warning_and_live_augmentation(
    world, tmp_path, caplog, data
):
    seed_everything(0)
    if data == "OtherDataModule":
        model, args = module(world), (OtherDataModule(str(world["data"])),)
    else:  # no datamodule to calibrate from: calibrated beforehand
        model, dm = _calibrated(world)
        args = (dm.train_dataloader(),)
    with caplog.at_level(logging.WARNING, logger="p4q_lightning"):
        batches = fit(model, tmp_path, *args)
    warned = [r.getMessage() for r in caplog.records if NO_SERVING in r.getMessage()]
    assert len(warned) == 1 and data in warned[0] and "features.views=0" in warned[0]
    assert batches.kinds == ["images"] * 4 and model._train_source is None
