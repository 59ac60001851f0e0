"""Large folders are listed once: the JSON index is reused until a folder changes."""

from __future__ import annotations

import os

import pytest
import suite_layouts as layouts
from data_helpers import write_image

from p4q_lightning.data import listing


def count_walks(monkeypatch) -> list[str]:
    walked: list[str] = []
    real = listing._walk

    def spy(root, *args):
        walked.append(str(root))
        return real(root, *args)

    monkeypatch.setattr(listing, "_walk", spy)
    return walked


def test_a_second_start_reads_the_index_instead_of_listing(tmp_path, dm_factory, monkeypatch):
    layouts.write_dataset(tmp_path, "imagenet")
    walked = count_walks(monkeypatch)
    first = dm_factory("imagenet", root=str(tmp_path)).source
    assert sorted(walked) == [
        str(tmp_path / "imagenet/images/train"),
        str(tmp_path / "imagenet/images/val"),
    ]
    index = sorted((tmp_path / "splits" / "index").glob("*.index"))
    assert len(index) == 2  # beside the split files
    walked.clear()
    second = dm_factory("imagenet", root=str(tmp_path)).source
    assert walked == []
    assert second.keys("train") == first.keys("train")
    assert second.labels("test") == first.labels("test")


def test_a_changed_folder_is_listed_again(tmp_path, dm_factory, monkeypatch):
    layouts.write_dataset(tmp_path, "imagenet")
    before = len(dm_factory("imagenet", root=str(tmp_path)).source.keys("train"))
    walked = count_walks(monkeypatch)
    folder = tmp_path / "imagenet/images/train/n01440764"
    added = write_image(folder / "new.JPEG", 99)
    stat = os.stat(folder)  # the same second on a coarse clock: still a different time
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    source = dm_factory("imagenet", root=str(tmp_path)).source
    assert walked == [str(tmp_path / "imagenet/images/train")]  # val is unchanged
    assert len(source.keys("train")) == before + 1
    assert f"images/train/n01440764/{added.name}" in source.keys("train")


@pytest.mark.parametrize("damage", ["{not json", "cut"])
def test_a_damaged_index_is_rebuilt(tmp_path, monkeypatch, damage):
    tree = tmp_path / "tree"
    write_image(tree / "a" / "x.png", 1)
    write_image(tree / "a" / "y.png", 2)
    index_dir = tmp_path / "index"
    listing.list_folder(tree, index_dir)
    path = listing.index_path(tree, index_dir)
    text = path.read_text()
    path.write_text(text[:-2] if damage == "cut" else damage)  # cut: the names run short
    walked = count_walks(monkeypatch)
    assert listing.list_folder(tree, index_dir).files("a") == ["x.png", "y.png"]
    assert len(walked) == 1 and path.read_text() == text  # listed again, index rewritten


@pytest.mark.slow
def test_the_benchmark_script_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_folder_index.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, str(script), "--classes", "20", "--per-class", "10", "--rounds", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio first / second" in out.stdout
