"""While a fit trains from cached features, the frozen teacher, both image towers and the
student's token table are out of memory and the student's text tower is held as int8 codes;
validation, test, checkpoints and export get them back unchanged, and the fit's numbers are
those of a fit that kept them."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import tiny_world
from p4q_lightning.callbacks import LowBitExportCallback
from p4q_lightning.export import load_lowbit
from p4q_lightning.module import P4QModule
from p4q_lightning.quant import QuantLinear
from p4q_lightning.training.residency import FrozenOffload

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _text_layers(module) -> list[QuantLinear]:
    tower = module.classifier.student.transformer
    return [m for m in tower.modules() if isinstance(m, QuantLinear)]


def _student_text(module) -> str:
    """How the student's text tower's quantized weights are held: float, int8 codes, mixed."""
    held = [
        q.held is not None and q.held.codes.dtype == torch.int8 and q.weight.numel() == 0
        for q in _text_layers(module)
    ]
    resident = all(q.weight.numel() > 0 or q.held is not None for q in _text_layers(module))
    assert resident
    return "codes" if all(held) else "float" if not any(held) else "mixed"


class Residency(Callback):
    """Records, at every training step, which frozen weights are resident, and how the student
    text tower is held whenever a checkpoint is saved."""

    def __init__(self) -> None:
        self.steps: list[dict[str, bool | str]] = []
        self.at_save: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        model = module.classifier
        self.steps.append(
            {
                "teacher": model.teacher.visual.conv1.weight.numel() > 0,
                "teacher text": model.teacher.transformer.resblocks[0].mlp.c_fc.weight.numel() > 0,
                "student image": model.student.visual.conv1.weight.numel() > 0,
                "student tokens": model.student.token_embedding.weight.numel() > 0,
                "student text": _student_text(module),
            }
        )

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.at_save.append(_student_text(module))


def _fit(world, tmp_path, release: bool, monkeypatch, **kw):
    if not release:
        monkeypatch.setattr(FrozenOffload, "release", lambda self: None)
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module = P4QModule(**tiny_world.module_args(world, feature_views=1, **kw))
    residency = Residency()
    export = LowBitExportCallback(dirpath=str(tmp_path), filename="m.safetensors")
    # one checkpoint at each train epoch's end (after that epoch's validation: weights held
    # again), one at each validation's end (weights back)
    at_epoch_end = ModelCheckpoint(
        dirpath=tmp_path / "epoch", save_top_k=-1, save_on_train_epoch_end=True
    )
    after_val = ModelCheckpoint(
        dirpath=tmp_path / "val",
        save_top_k=-1,
        monitor="val/top1",
        mode="max",
        save_on_train_epoch_end=False,
    )
    trainer = tiny_world.trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[residency, export, at_epoch_end, after_val],
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    )
    trainer.fit(module, dm)
    with torch.no_grad():
        logits = module.classifier.student_logits(tiny_world.random_images(8, seed=5))
    test = trainer.test(module, dm, verbose=False)[0]
    monkeypatch.undo()
    ckpts = {
        f"{kind}/{p.name}": torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
        for kind in ("epoch", "val")
        for p in sorted((tmp_path / kind).glob("*.ckpt"))
    }
    fit = {"steps": residency.steps, "at_save": residency.at_save, "checkpoints": ckpts}
    return module, fit, logits, test, tmp_path / "m.safetensors"


def test_fit_from_the_cache_keeps_only_what_the_step_reads(world, tmp_path, monkeypatch):
    module, fit, logits, test, exported = _fit(world, tmp_path / "a", True, monkeypatch)
    assert len(fit["steps"]) == 8  # two epochs of 4 steps, validation after each
    for step in fit["steps"]:
        assert step == {
            "teacher": False,
            "teacher text": False,
            "student image": False,
            "student tokens": False,
            "student text": "codes",
        }
    # checkpoints written while the text tower was held as codes and while it was float
    assert sorted(set(fit["at_save"])) == ["codes", "float"]
    # after the fit everything is back and the file is gone
    assert module._offload is None
    assert all(p.numel() > 0 for p in module.classifier.teacher.parameters())
    assert all(p.numel() > 0 for p in module.classifier.student.parameters())
    assert all(q.held is None for q in _text_layers(module))
    # the same numbers as a fit that kept every weight resident, as float
    kept, kept_fit, kept_logits, kept_test, kept_export = _fit(
        world, tmp_path / "b", False, monkeypatch
    )
    assert all(s.pop("student text") == "float" and all(s.values()) for s in kept_fit["steps"])
    assert set(kept_fit["at_save"]) == {"float"}
    assert torch.equal(module.classifier.prompt_learner.ctx, kept.classifier.prompt_learner.ctx)
    # the same checkpoints: no key added, dropped or changed by what was held how at the save
    assert list(fit["checkpoints"]) == list(kept_fit["checkpoints"])
    assert len(fit["checkpoints"]) == 4
    for name, state in fit["checkpoints"].items():
        want = kept_fit["checkpoints"][name]
        assert list(state) == list(want), name
        for key, value in state.items():
            assert torch.equal(value, want[key]), (name, key)
    # the student's float weights after the fit are bitwise those of the kept fit
    got, want = module.classifier.student.state_dict(), kept.classifier.student.state_dict()
    for key, value in want.items():
        assert torch.equal(
            got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), key
    assert torch.equal(logits, kept_logits)
    assert test == kept_test
    # export after the fit works and writes what the resident fit writes
    with torch.no_grad():
        images = tiny_world.random_images(4, seed=6)
        a, b = load_lowbit(exported), load_lowbit(kept_export)
        torch.testing.assert_close(a.logits(images), b.logits(images), rtol=0, atol=0)


def test_teacher_prompt_distillation_keeps_the_teacher_text_tower(world, tmp_path, monkeypatch):
    """With ``teacher_text: prompt`` each step runs the prompt through the float text tower,
    so it stays; the image towers still leave."""
    _, fit, *_ = _fit(world, tmp_path, True, monkeypatch, teacher_text="prompt")
    assert fit["steps"] and all(
        s["teacher text"]
        and s["student text"] == "codes"
        and not s["teacher"]
        and not s["student image"]
        for s in fit["steps"]
    )


def test_after_a_failed_fit_the_next_stage_brings_the_weights_back(world, tmp_path, monkeypatch):
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module = P4QModule(**tiny_world.module_args(world, feature_views=1))

    class Boom(Callback):
        def on_train_batch_start(self, *args) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_world.trainer(tmp_path, callbacks=[Boom()]).fit(module, dm)
    assert module.classifier.teacher.visual.conv1.weight.numel() == 0  # no hook ran
    result = tiny_world.trainer(tmp_path).validate(module, dm, verbose=False)[0]
    assert 0 <= result["val/top1"] <= 1
    assert all(p.numel() > 0 for p in module.classifier.teacher.parameters())
    assert all(p.numel() > 0 for p in module.classifier.student.parameters())


def test_frozen_offload_round_trip_is_bitwise_and_keeps_the_parameter_objects():
    towers = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))
    kept = towers[1]
    towers.requires_grad_(False)
    before = {k: v.clone() for k, v in towers.state_dict().items()}
    params = list(towers.parameters())
    offload = FrozenOffload([towers], keep=[kept])
    assert offload.nbytes == 128 * 64 * 4  # only the first weight: kept and small ones stay
    offload.release()
    assert towers[0].weight.numel() == 0 and towers[1].weight.numel() == 128 * 64
    offload.release()  # twice is once
    offload.restore()
    assert list(towers.parameters()) == params
    for k, v in towers.state_dict().items():
        assert torch.equal(v, before[k]), k
    offload.release()  # written once: released again without rewriting
    offload.close()
    assert towers[0].weight.numel() == 128 * 64 and offload._dir is None
