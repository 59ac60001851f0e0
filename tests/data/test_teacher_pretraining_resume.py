"""Teacher pretraining survives interruption and says when it waits for another process."""

from __future__ import annotations

import logging
import stat
import threading

import pytest
import torch
from filelock import FileLock

from p4q_lightning.model import tiny_clip
from p4q_lightning.model.tiny_clip import PretrainConfig, ensure_teacher_checkpoint

# two steps of the frozen-text warm-up, then four with the text tower training
QUICK = PretrainConfig(
    steps=6, batch_size=8, warmup_steps=1, warmup_text_frozen_steps=2, eval_per_class=1
)


class Stop(RuntimeError):
    pass


def stop_at(step: int):
    def callback(done: int, model) -> None:
        if done == step:
            raise Stop

    return callback


def test_interrupted_pretraining_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = tiny_clip.pretrain_tiny_clip(3, QUICK).state_dict()
    progress = tmp_path / "teacher.progress.pt"
    with pytest.raises(Stop):
        tiny_clip.pretrain_tiny_clip(
            3, QUICK, callback=stop_at(5), progress_path=progress, save_every=2
        )
    assert torch.load(progress, weights_only=True)["step"] == 4
    torch.manual_seed(999)  # the resumed run restores every random state it depends on
    steps: list[int] = []
    resumed = tiny_clip.pretrain_tiny_clip(
        3, QUICK, callback=lambda s, m: steps.append(s), progress_path=progress, save_every=2
    ).state_dict()
    assert steps == [5, 6]  # only the lost steps ran again
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_waiting_for_another_process_is_announced(tmp_path, caplog):
    stem = f"{tiny_clip.MODEL_NAME}-world5-{tiny_clip.recipe_fingerprint(5, QUICK)}"
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
        (tmp_path / f"{stem}.safetensors").write_bytes(b"teacher")
    worker.join(10)
    assert "waiting for another process to finish pretraining" in caplog.text
    assert result["path"] == tmp_path / f"{stem}.safetensors"


def test_cached_teacher_files_follow_the_umask(tmp_path):
    path = ensure_teacher_checkpoint(world_seed=6, cache_dir=tmp_path, config=QUICK)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~_umask()
    assert not list(tmp_path.glob("*.progress.pt"))  # the finished run leaves no progress file


def _umask() -> int:
    from p4q_lightning.files import current_umask

    return current_umask()
