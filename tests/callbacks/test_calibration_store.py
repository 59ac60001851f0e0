"""The calibrated student and the teacher's class embeddings from the frozen-work store equal
a fresh calibration bit for bit; another quant spec or other classes miss the store."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import tiny_world
from p4q_lightning.callbacks.calibration import CalibrationCallback
from p4q_lightning.module import P4QModule


def _calibrate(world, store, **overrides):
    features = {"cache_dir": str(store)} if store is not None else {}
    args = tiny_world.module_args(
        world, quant_overrides=tiny_world.MINMAX, features=features, **overrides
    )
    module = P4QModule(**args)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module.set_classes(dm.classnames, dm.templates)
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, loggers=[], global_step=0)
    CalibrationCallback(progress=False).calibrate(trainer, module)
    model = module.classifier
    images = next(iter(dm.calibration_dataloader()))[0][:4]
    state = {
        k: v.clone()
        for k, v in module.state_dict().items()
        if not k.startswith("classifier.teacher.")
    }
    return state, model.student_logits(images).detach(), model.teacher_text_features().clone()


def test_stored_calibration_equals_a_fresh_one_bit_for_bit(world, tmp_path, caplog) -> None:
    plain = _calibrate(world, None)
    first = _calibrate(world, tmp_path)  # computes and stores
    entries = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.pt"))
    assert entries == ["calibration", "teacher"]
    caplog.set_level("INFO", logger="p4q_lightning")
    again = _calibrate(world, tmp_path)  # loads
    assert any("loaded the calibrated student" in r.getMessage() for r in caplog.records)
    for run in (first, again):
        assert run[0].keys() == plain[0].keys()
        for key, value in plain[0].items():
            assert torch.equal(run[0][key], value), key
        assert torch.equal(run[1], plain[1]) and torch.equal(run[2], plain[2])


def test_another_quant_spec_is_another_entry(world, tmp_path) -> None:
    _calibrate(world, tmp_path)
    _calibrate(world, tmp_path, quant="w8a8")
    assert len(list(tmp_path.glob("calibration-*.pt"))) == 2
    assert len(list(tmp_path.glob("teacher-text-*.pt"))) == 1  # the teacher is the same


def _lora_factors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


def test_clip_lora_keeps_its_own_factors_and_does_not_share_another_methods_entry(
    world, tmp_path, monkeypatch, caplog
) -> None:
    """CLIP-LoRA's factors are drawn from the run seed: a run of another seed that finds the
    calibration stored keeps its own factors (the store holds none), and KgCoOp's entry (the same
    student without LoRA wrappers) is another entry, not a foreign one read and overwritten."""
    caplog.set_level("WARNING", logger="p4q_lightning")
    _calibrate(world, tmp_path, method="kgcoop")  # no adapter: only the layout differs
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    first = _calibrate(world, tmp_path, method="clip_lora")  # stores CLIP-LoRA's
    assert len(list(tmp_path.glob("calibration-*.pt"))) == 2
    assert not any("unreadable" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    plain = _calibrate(world, None, method="clip_lora")
    stored = _calibrate(world, tmp_path, method="clip_lora")  # loads seed 1's calibration
    factors = _lora_factors(plain[0])
    assert factors and factors.keys() == _lora_factors(stored[0]).keys()
    for key, value in factors.items():  # seed 2's own factors, not seed 1's
        assert torch.equal(stored[0][key], value), key
    assert any(not torch.equal(first[0][k], v) for k, v in factors.items())
    for key, value in plain[0].items():  # and everything else a fresh calibration's
        assert torch.equal(stored[0][key], value), key
    assert torch.equal(stored[1], plain[1])
