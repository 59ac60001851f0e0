"""Calibration does not depend on how the calibration images are batched: they are re-cut into
batches of ``calib_batch_size``, the last batch being the last ``calib_batch_size`` images; under
DDP every rank takes rank zero's calibration."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_world
from p4q_lightning import distributed
from p4q_lightning.callbacks.calibration import CalibrationCallback
from p4q_lightning.module import P4QModule
from p4q_lightning.quant.calibrate import fixed_batches

CALIB_BATCH = 12  # 32 images: batches of 12, 8 and the last 12
# 96 images x 17 tokens x 64 features: more than the 65,536 values a sampling observer keeps


class CalibData(tiny_world.TinyDataModule):
    """96 training images as calibration data, served in batches of ``batch_size`` (the
    training batch size, as a custom datamodule may do), calibrated in batches of 40."""

    calib_batch_size = 40

    def __init__(self, root: str, batch_size: int) -> None:
        super().__init__(root, batch_size=batch_size, calibration_images=96)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration-folder")
    return tiny_world.write_image_folder(root, train_per_class=24, val_per_class=1)


def calibrated(world, folder, preset: str, loader_batch: int) -> dict[str, torch.Tensor]:
    module = P4QModule(**tiny_world.module_args(world, quant=preset))
    dm = CalibData(str(folder), loader_batch)
    dm.setup()
    module.set_classes(dm.classnames, dm.templates)
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, loggers=[], global_step=0)
    CalibrationCallback(progress=False).calibrate(trainer, module)
    return {k: v.clone() for k, v in module.state_dict().items() if "quantizer." in k}


def test_fixed_batches_cut_depends_only_on_the_number_of_images():
    images = torch.arange(32.0)[:, None]
    for cut in ([32], [8] * 4, [5, 1, 20, 6], [3] * 10 + [2], [0, 32, 0]):
        pieces = list(torch.split(images, cut)) if sum(cut) == 32 else None
        batches = list(fixed_batches(pieces, CALIB_BATCH))
        assert [b.shape[0] for b in batches] == [12, 8, 12], cut
        assert torch.equal(torch.cat(batches), images)
        assert torch.equal(batches[-1], images[-12:])  # the last batch: the last 12 images
    assert [b.shape[0] for b in fixed_batches([images[:7]], CALIB_BATCH)] == [7]
    assert [b.shape[0] for b in fixed_batches([images[:24]], CALIB_BATCH)] == [12, 12]
    assert list(fixed_batches([], CALIB_BATCH)) == []
    with pytest.raises(ValueError, match="calibration batch size"):
        list(fixed_batches([images], 0))


@pytest.mark.parametrize("preset", ["w4a4", "p4q-official"])
def test_the_loader_batch_size_does_not_change_the_calibration(world, folder, preset):
    """w4a4: OMSE on a sample drawn per batch; p4q-official: OMSE scored on the last batch."""
    reference = calibrated(world, folder, preset, 8)
    for loader_batch in (5, 96):
        other = calibrated(world, folder, preset, loader_batch)
        assert [k for k in reference if not torch.equal(reference[k], other[k])] == []


def _broadcast_worker(rank: int, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tensors = [
            torch.full((3,), float(rank + 1)),
            torch.tensor([rank], dtype=torch.int32),
            torch.tensor(rank == 0),
        ]
        distributed.broadcast_in_place(tensors, src=0)
        out.put((rank, [t.tolist() for t in tensors]))
    finally:
        dist.destroy_process_group()


def test_broadcast_in_place_gives_every_rank_rank_zeros_values():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("fork").SimpleQueue()  # fork: the children need no re-import
    mp.start_processes(_broadcast_worker, (port, out), nprocs=2, start_method="fork")
    results = dict(out.get() for _ in range(2))
    assert results[0] == results[1] == [[1.0, 1.0, 1.0], [0], True]


def test_the_callback_hands_every_calibrated_buffer_to_the_broadcast(world, monkeypatch):
    """Under DDP (one process here: the broadcast is recorded) the callback broadcasts rank
    zero's calibration of the student and the adapter right after calibrating."""
    sent: list[list[torch.Tensor]] = []
    monkeypatch.setattr(distributed, "broadcast_in_place", lambda t, *a: sent.append(list(t)))
    module = P4QModule(**tiny_world.module_args(world, quant_overrides=tiny_world.MINMAX))
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module.set_classes(dm.classnames, dm.templates)
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, loggers=[], global_step=0)
    CalibrationCallback(progress=False).calibrate(trainer, module)
    assert len(sent) == 1
    model = module.classifier
    calibrated = {id(v) for k, v in model.state_dict(keep_vars=True).items() if "quantizer." in k}
    quantized = {id(b) for part in (model.student, model.adapter) for b in part.buffers()}
    assert calibrated <= {id(t) for t in sent[0]} <= quantized
