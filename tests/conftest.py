"""Suite-wide settings: one intra-op thread per process.

The tests run many tiny models and spawn DDP workers; on a 2-core machine extra intra-op threads
only fight each other (the suite runs ~2x faster with one).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402

import tiny_world  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """A registered tiny open_clip config and a small generated image-folder dataset (read-only)."""
    root = tmp_path_factory.mktemp("world")
    return {
        "root": root,
        "config": tiny_world.write_model_config(root / "cfg"),
        "data": tiny_world.write_image_folder(root / "data"),
    }


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
