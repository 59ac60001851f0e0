"""``p4q-official`` through ``P4QModule``: calibration (student and adapter) and a short fit."""

from __future__ import annotations

import warnings

from lightning.pytorch import seed_everything

import tiny_world
from p4q_lightning.module import P4QModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_p4q_official_module_calibrates_and_fits(world, tmp_path) -> None:
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module = P4QModule(**tiny_world.module_args(world, quant="p4q-official", feature_views=1))
    module.set_classes(dm.classnames, dm.templates)
    module.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    assert not module.classifier.needs_calibration
    assert module.classifier.student.visual.conv1.input_quantizer.scale.shape == (3,)
    fc1 = module.classifier.adapter.fc1.input_quantizer
    assert fc1.per_channel and fc1.scale.shape == (module.classifier.adapter.dim,)
    trainer = tiny_world.trainer(tmp_path)
    trainer.fit(module, dm)
    (metrics,) = trainer.validate(module, dm, verbose=False)
    assert 0.0 <= metrics["val/top1"] <= 100.0
