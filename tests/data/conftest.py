"""Fixtures for the data tests: generated image folders and a datamodule factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import WNIDS, write_class_folders


@pytest.fixture
def imagenet_folder(tmp_path: Path) -> Path:
    """ImageNet layout: train/<wnid>/*.JPEG (10 per class) and val/<wnid>/*.JPEG (3 per class)."""
    root = tmp_path / "imagenet"
    write_class_folders(root / "train", list(WNIDS), 10, ext=".JPEG")
    write_class_folders(root / "val", list(WNIDS), 3, ext=".JPEG", seed=1)
    return root


@pytest.fixture
def dm_factory(tmp_path: Path) -> Callable[..., object]:
    """Build a FewShotDataModule with CPU-friendly defaults and a private split_dir."""
    from p4q_lightning.data import FewShotDataModule

    def make(dataset: str, **kw: object) -> FewShotDataModule:
        kw.setdefault("num_workers", 0)
        kw.setdefault("batch_size", 8)
        kw.setdefault("split_dir", str(tmp_path / "splits"))
        kw.setdefault("image_size", 16)
        return FewShotDataModule(dataset, **kw)

    return make
