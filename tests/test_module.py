"""P4QModule end to end on a tiny CLIP and a generated image folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import tiny_world
from p4q_lightning.callbacks import CalibrationCallback
from p4q_lightning.methods import METHODS
from p4q_lightning.module import P4QModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def make_module(world, **kw) -> P4QModule:
    defaults = {"prompt_lr": 0.05, "adapter_lr": 0.01, "feature_views": 2}
    return P4QModule(**tiny_world.module_args(world, **{**defaults, **kw}))


def make_dm(world, **kw) -> tiny_world.TinyDataModule:
    dm = tiny_world.TinyDataModule(str(world["data"]), **kw)
    dm.setup()
    return dm


def trainer(tmp_path, **kw) -> Trainer:
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
    )
    args.update(kw)
    return Trainer(**args)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_two_epoch_fit_trains_only_prompts_and_adapter(world, tmp_path):
    seed_everything(0)
    dm = make_dm(world)
    module = make_module(world)
    module.set_classes(dm.classnames, dm.templates)
    module.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    fresh_teacher = make_module(world, method="zeroshot").classifier.teacher.state_dict()
    recorder = LossRecorder()
    trainer(tmp_path, max_epochs=2, callbacks=[recorder]).fit(module, dm)
    assert len(recorder.losses) == 8
    first, last = sum(recorder.losses[:4]) / 4, sum(recorder.losses[-4:]) / 4
    assert last < first, recorder.losses
    changed = {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {
        "classifier.prompt_learner.ctx",
        *(f"classifier.adapter.{n}" for n, _ in module.classifier.adapter.named_parameters()),
    }
    for k, v in module.classifier.teacher.state_dict().items():
        assert torch.equal(v, fresh_teacher[k]), k
    assert all(not p.requires_grad for p in module.classifier.teacher.parameters())
    assert all(not p.requires_grad for p in module.classifier.student.parameters())


def test_only_prompts_and_adapter_require_grad(world):
    module = make_module(world, classnames=["a", "b"])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {
        "classifier.prompt_learner.ctx",
        *(f"classifier.adapter.{n}" for n, _ in module.classifier.adapter.named_parameters()),
    }
    module.classifier.teacher.visual.proj.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only prompt and adapter"):
        module._check_trainable()


@pytest.fixture(scope="module")
def fitted(world, tmp_path_factory):
    """A p4q module fitted for one epoch, and its checkpoint."""
    seed_everything(0)
    tmp = tmp_path_factory.mktemp("fit")
    dm = make_dm(world)
    module = make_module(world)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="last")
    trainer(tmp, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(module, dm)
    return module, Path(ckpt.best_model_path or ckpt.last_model_path or tmp / "last.ckpt"), dm


def test_checkpoint_holds_no_frozen_clip_weights(fitted):
    module, path, _ = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert "classifier.prompt_learner.ctx" in keys
    assert any(k.startswith("classifier.adapter.") for k in keys)
    assert not any(k.startswith("classifier.teacher.") for k in keys)
    student = [k for k in keys if k.startswith("classifier.student.")]
    assert student and all("quantizer." in k for k in student)
    assert ckpt["hyper_parameters"]["model_name"] == tiny_world.MODEL_NAME
    assert ckpt["p4q"]["classnames"] == module.classifier.classnames
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["prompt", "adapter"]
    full = sum(v.numel() for v in module.classifier.teacher.state_dict().values())
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved < 0.1 * full


def test_load_from_checkpoint_gives_identical_logits(fitted):
    module, path, dm = fitted
    images = next(iter(dm.val_dataloader()))[0]
    module.eval()
    want = module.classifier.student_logits(images)
    restored = P4QModule.load_from_checkpoint(path).eval()
    assert not restored.classifier.needs_calibration
    assert torch.equal(restored.classifier.student_logits(images), want)
    assert torch.equal(
        restored.classifier.teacher_logits(images), module.classifier.teacher_logits(images)
    )


def test_checkpoint_in_the_old_attention_layout_loads(fitted, tmp_path):
    """Slim checkpoints written before attention's q/k/v projection became the ``in_proj``
    leaf name its quantizers ``attn.input_quantizer.*`` / ``attn.weight_quantizer.*``, and
    those written before the classifier was its own module lack the ``classifier.`` prefix; a
    checkpoint is data, so such a file is built by renaming a new one's keys back."""
    module, path, dm = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {
        k.replace(".attn.in_proj.", ".attn.").removeprefix("classifier."): v
        for k, v in ckpt["state_dict"].items()
    }
    assert any(".attn.input_quantizer." in k for k in renamed)
    assert "prompt_learner.ctx" in renamed
    ckpt["state_dict"] = renamed
    old = tmp_path / "old_layout.ckpt"
    torch.save(ckpt, old)
    images = next(iter(dm.val_dataloader()))[0]
    restored = P4QModule.load_from_checkpoint(old).eval()  # strict: every key is placed
    assert not restored.classifier.needs_calibration
    assert torch.equal(
        restored.classifier.student_logits(images), module.eval().classifier.student_logits(images)
    )


def test_trainer_restores_into_a_fresh_module(world, fitted, tmp_path):
    module, path, dm = fitted
    images = next(iter(dm.val_dataloader()))[0]
    want = module.eval().classifier.student_logits(images)
    fresh = make_module(world)
    results = trainer(tmp_path).validate(fresh, dm, ckpt_path=str(path), verbose=False)
    assert "val/top1" in results[0] and "val/top5" in results[0]
    assert torch.equal(fresh.eval().classifier.student_logits(images), want)
    # resume training continues from the saved step and optimizer state
    resumed = make_module(world)
    t = trainer(tmp_path, max_epochs=2)
    t.fit(resumed, dm, ckpt_path=str(path))
    assert t.global_step == 8


def test_learned_prompt_transfers_to_another_class_list(fitted):
    module, path, dm = fitted
    restored = P4QModule.load_from_checkpoint(path).eval()
    restored.set_classes(["purple star", "orange ring", "red circle"])
    images = next(iter(dm.val_dataloader()))[0]
    assert restored.classifier.student_logits(images).shape == (images.shape[0], 3)
    assert torch.equal(restored.classifier.prompt_learner.ctx, module.classifier.prompt_learner.ctx)


def test_checkpoint_of_other_weights_is_refused(world, fitted):
    _, path, _ = fitted
    with pytest.raises(ValueError, match="other CLIP weights"):
        P4QModule.load_from_checkpoint(path, init_seed=1)


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].uses_adapter])
def test_baseline_methods_run_end_to_end(world, tmp_path, method):
    seed_everything(0)
    dm = make_dm(world)
    module = make_module(world, method=method)
    t = trainer(tmp_path, max_epochs=1)
    if METHODS[method].fits:
        t.fit(module, dm)
        assert module.classifier.adapter is None
        assert (module.classifier.student is module.classifier.teacher) == (
            not METHODS[method].quantized
        )
    else:
        with pytest.raises(ValueError, match="nothing to train"):
            t.fit(module, dm)
    result = trainer(tmp_path).test(module, dm, verbose=False)[0]
    assert 0.0 <= result["test/top1"] <= result["test/top5"] <= 1.0
    images = next(iter(dm.val_dataloader()))[0]
    if method == "zeroshot":
        assert torch.allclose(
            module.classifier.student_logits(images), module.classifier.teacher_logits(images)
        )
    if method == "ptq":
        assert not module.classifier.needs_calibration
        assert not torch.allclose(
            module.classifier.student_logits(images), module.classifier.teacher_logits(images)
        )


def test_calibration_callback_is_added_once_and_skips_a_calibrated_student(world, tmp_path):
    dm = make_dm(world)
    module = make_module(world, method="ptq")
    own = CalibrationCallback(max_texts=3)
    t = trainer(tmp_path, callbacks=[own])
    t.test(module, dm, verbose=False)
    assert [cb for cb in t.callbacks if isinstance(cb, CalibrationCallback)] == [own]
    assert own.seconds is not None and own.stats
    assert {"scale", "clip_ratio"} <= set(next(iter(own.stats.values())))
    own.seconds = None
    t.test(module, dm, verbose=False)
    assert own.seconds is None  # already calibrated: skipped


def test_clear_errors(world):
    with pytest.raises(ValueError, match="unknown method"):
        make_module(world, method="qat")
    module = make_module(world, classnames=["a", "b", "c"])
    t = Trainer(accelerator="cpu", logger=False)
    module.trainer = t
    t.datamodule = make_dm(world)  # 4 classes
    with pytest.raises(ValueError, match="3 classes but the datamodule has 4"):
        module.setup("fit")


def test_validate_then_fit_in_one_process(world, tmp_path):
    """Calibration inside an inference-mode evaluation must not poison a later fit."""
    seed_everything(0)
    dm = make_dm(world)
    module = make_module(world, feature_views=0, teacher_text="prompt", distill_kind="official")
    trainer(tmp_path).validate(module, dm, verbose=False)
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, dm)
    assert t.global_step == 4
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_vit_b32_checkpoint_is_a_few_megabytes():
    import io

    import open_clip

    module = P4QModule(
        "ViT-B-32-quickgelu",
        None,
        quant="w8a8",
        classnames=list(open_clip.IMAGENET_CLASSNAMES[:10]),
    )
    module.classifier.calibrate([torch.randn(4, 3, 224, 224)], progress=False)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    assert buf.tell() < 8 * 2**20  # vs ~577 MB for the float32 state dict


def test_with_the_real_few_shot_datamodule_on_an_image_folder(world, tmp_path):
    data = pytest.importorskip("p4q_lightning.data")
    if not hasattr(data, "FewShotDataModule"):
        pytest.skip("FewShotDataModule not available")
    seed_everything(0)
    dm = data.FewShotDataModule(
        dataset=str(world["data"]),
        shots=4,
        seed=1,
        batch_size=8,
        num_workers=0,
        image_size=32,
        calib_images=16,
        split_dir=str(tmp_path / "splits"),
    )
    module = make_module(world)
    trainer(tmp_path, max_epochs=1).fit(module, dm)
    assert (
        module.classifier.classnames == dm.classnames
        and module.classifier.templates == dm.templates
    )
    assert not module.classifier.needs_calibration
    result = trainer(tmp_path).test(module, dm, verbose=False)[0]
    assert 0.0 <= result["test/top1"] <= 1.0
