"""Cache and export files get the umask's mode (shareable), not mkstemp's owner-only 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from p4q_lightning.export import write_container
from p4q_lightning.files import atomic_write
from p4q_lightning.training.feature_cache import FeatureCache, load_or_build


@pytest.fixture()
def umask_002():
    old = os.umask(0o002)
    yield 0o664
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_feature_cache_file_follows_the_umask(tmp_path, umask_002):
    cache = FeatureCache({"student": torch.zeros(1, 2, 3)}, torch.zeros(2).long(), torch.zeros(2))
    load_or_build(tmp_path, "key", lambda: cache)
    assert mode(tmp_path / "features-key.pt") == umask_002


def test_export_file_follows_the_umask(tmp_path, umask_002):
    write_container(tmp_path / "m.safetensors", {"a": torch.zeros(2)}, {})
    assert mode(tmp_path / "m.safetensors") == umask_002


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
