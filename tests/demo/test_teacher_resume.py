"""Teacher pretraining survives interruption and says when it waits for another process."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file

from p4q_lightning.demo import teacher
from p4q_lightning.demo.teacher import PretrainConfig, ensure_teacher_checkpoint

# one step of the frozen-text warm-up, then three with the text tower training
QUICK = PretrainConfig(
    steps=4, batch_size=8, warmup_steps=1, warmup_text_frozen_steps=1, eval_per_class=1
)


class Stop(RuntimeError):
    pass


def stop_at(step: int):
    def callback(done: int, model) -> None:
        if done == step:
            raise Stop

    return callback


def test_interrupted_pretraining_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = teacher.pretrain_tiny_clip(3, QUICK).state_dict()
    progress = tmp_path / "teacher.progress.pt"
    with pytest.raises(Stop):
        teacher.pretrain_tiny_clip(
            3, QUICK, callback=stop_at(3), progress_path=progress, save_every=2
        )
    assert torch.load(progress, weights_only=True)["step"] == 2
    torch.manual_seed(999)  # the resumed run restores every random state it depends on
    steps: list[int] = []
    resumed = teacher.pretrain_tiny_clip(
        3, QUICK, callback=lambda s, m: steps.append(s), progress_path=progress, save_every=2
    ).state_dict()
    assert steps == [3, 4]  # only the lost steps ran again
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_waiting_for_another_process_is_announced(tmp_path, caplog):
    stem = f"{teacher.MODEL_NAME}-world5-{teacher.recipe_fingerprint(5, QUICK)}"
    lock = FileLock(str(tmp_path / f"{stem}.lock"))
    result: dict = {}
    with lock:
        caplog.set_level(logging.WARNING, logger="p4q_lightning")
        worker = threading.Thread(
            target=lambda: result.update(
                path=ensure_teacher_checkpoint(world_seed=5, cache_dir=tmp_path, config=QUICK)
            )
        )
        worker.start()
        for _ in range(200):
            if "waiting for another process" in caplog.text:
                break
            worker.join(0.05)
        # the "other process" finishes: its file appears, then it releases the lock
        save_file({"w": torch.zeros(1)}, str(tmp_path / f"{stem}.safetensors"))
    worker.join(10)
    assert "waiting for another process to finish pretraining" in caplog.text
    assert result["path"] == tmp_path / f"{stem}.safetensors"
