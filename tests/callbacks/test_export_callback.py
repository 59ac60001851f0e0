"""LowBitExportCallback on a short P4Q fit: the file loads and reproduces the module's logits."""

import pytest
import torch

import tiny_world
from p4q_lightning.callbacks.export import LowBitExportCallback  # noqa: E402
from p4q_lightning.export import load_lowbit, read_container  # noqa: E402
from p4q_lightning.export.format import ExportWriteError
from p4q_lightning.module import P4QModule  # noqa: E402


def make_module(world, **kw) -> P4QModule:
    args = dict(
        model_name=tiny_world.MODEL_NAME,
        pretrained=None,
        model_config=str(world["config"]),
        quant="w4a4",
        quant_overrides=tiny_world.MINMAX,
        prompt={"n_ctx": 4},
        optim={"prompt_lr": 0.05, "adapter_lr": 0.01},
        features={"views": 1},
    )
    args.update(kw)
    return P4QModule(**args)


def _trainer(tmp_path, callbacks, epochs=1):
    return tiny_world.trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def test_export_after_fit_loads_with_equal_logits(world, tmp_path) -> None:
    module = make_module(world)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    cb = LowBitExportCallback()
    _trainer(tmp_path, [cb]).fit(module, datamodule=dm)
    path = tmp_path / "model-lowbit.safetensors"
    assert cb.report is not None and cb.report.path == path and path.stat().st_size > 0
    loaded = load_lowbit(path)
    images = torch.stack([dm.val_dataset[i][0] for i in range(len(dm.val_dataset))])
    module.eval()
    with torch.no_grad():
        ref = module.classifier.student_logits(images)
    out = loaded.logits(images)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert loaded.classnames == module.classifier.classnames
    assert torch.equal(loaded.prompt_ctx, module.classifier.prompt_learner.ctx.detach())
    _, info = read_container(path)
    assert info["extra"]["method"] == "p4q" and info["adapter"]["kind"] == "low_bit_adapter"
    assert info["model"]["config"]["vision_cfg"]["width"] == 64


def test_float_methods_are_skipped(world, tmp_path) -> None:
    module = make_module(world, method="coop", prompt={"n_ctx": 2})
    cb = LowBitExportCallback(dirpath=str(tmp_path / "out"))
    _trainer(tmp_path, [cb]).fit(module, datamodule=tiny_world.TinyDataModule(str(world["data"])))
    assert cb.report is None and not (tmp_path / "out").exists()


def test_an_unwritable_export_path_fails_before_training(world, tmp_path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the export directory should be")
    module = make_module(world)
    cb = LowBitExportCallback(dirpath=str(blocker / "out"))
    trainer = _trainer(tmp_path, [cb])
    with pytest.raises(ExportWriteError, match="cannot create the export directory"):
        trainer.fit(module, datamodule=tiny_world.TinyDataModule(str(world["data"])))
    assert trainer.global_step == 0  # refused at setup, before any step
    assert module.classifier.needs_calibration  # not even calibrated: nothing slow ran


def test_bad_option() -> None:
    with pytest.raises(ValueError, match="after="):
        LowBitExportCallback(after="never")
