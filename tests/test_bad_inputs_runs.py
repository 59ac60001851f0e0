"""A fit that fails before its first training step does not block its own rerun; a one-class
folder is refused before W&B starts; no W&B "anonymous setting" warning."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import wandb

import tiny_world
from p4q_lightning import cli, rundir

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("P4Q_DEBUG", raising=False)
    yield
    if wandb.run is not None:  # a later test's WandbLogger would attach to this run
        wandb.finish()


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def restarts(err: str) -> list[str]:
    return [line for line in err.splitlines() if "never completed a training step" in line]


def write_folder(root: Path, classes: int, per_class: int = 6) -> Path:
    rng = random.Random(0)
    for name, (color, shape) in list(tiny_world.CLASSES.items())[:classes]:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(per_class):
            tiny_world._draw(color, shape, rng).save(folder / f"{i}.png")
    return root


def write_config(world, tmp: Path, dataset: Path, wandb_logger: bool, **model) -> Path:
    data = {
        "class_path": "p4q_lightning.data.FewShotDataModule",
        "init_args": {
            "dataset": str(dataset),
            "shots": 2,
            "image_size": 32,
            "num_workers": 0,
            "persistent_workers": False,
            "batch_size": 8,
            "calib_images": 8,
            "split_dir": str(tmp / "splits"),
        },
    }
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "p4q-tests"},
    }
    return tiny_world.cli_config(
        world,
        tmp / "config.yaml",
        trainer={"logger": logger if wandb_logger else False, "enable_checkpointing": False},
        model={"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}, **model},
        data=data,
    )


def test_a_fit_that_never_stepped_does_not_block_its_rerun(world, tmp_path, capsys, monkeypatch):
    one_class = write_folder(tmp_path / "one", classes=1)
    two_classes = write_folder(tmp_path / "two", classes=2)
    run = tmp_path / "run"

    def fit(dataset: Path, wandb_logger: bool, **model) -> int | None:
        cfg = write_config(world, tmp_path, dataset, wandb_logger, **model)
        return cli.main(["fit", "--config", str(cfg), "--run_dir", str(run)])

    # 1. a one-class folder: refused in one line naming the folder, before W&B starts
    assert fit(one_class, wandb_logger=True) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"the image folder {one_class} has only the class 'red_circle'" in line
    assert "at least two classes" in line and "one sub-folder per class" in line
    assert (run / rundir.WANDB_ID_FILE).is_file() and not (run / "wandb").exists()
    first_id = (run / rundir.WANDB_ID_FILE).read_text()

    # 2. the folder fixed, another early failure (an unknown preset): not "already holds a run"
    assert fit(two_classes, wandb_logger=True, quant="w9a9") == 1
    err = capsys.readouterr().err
    line = one_line_error(err)
    assert "already holds a run" not in line and "w9a9" in line
    assert len(restarts(err)) == 1 and f"{run} holds only the wandb_id" in restarts(err)[0]
    assert (run / rundir.WANDB_ID_FILE).read_text() != first_id  # a new W&B run

    # 3. everything fixed: the fit runs, with W&B (offline) and no "anonymous" warning
    termwarn = []
    monkeypatch.setattr(wandb, "termwarn", lambda *a, **k: termwarn.append(" ".join(map(str, a))))
    assert fit(two_classes, wandb_logger=True) is None
    assert len(restarts(capsys.readouterr().err)) == 1
    assert not [w for w in termwarn if "anonymous" in w], termwarn
    assert (run / rundir.TRAINED_MARKER).is_file() and (run / "wandb").is_dir()

    # 4. a run that trained is protected as before
    assert fit(two_classes, wandb_logger=False) == 1
    assert f"{run} already holds a run" in one_line_error(capsys.readouterr().err)


def test_a_run_with_a_result_but_no_marker_still_counts(tmp_path):
    """Run directories written before the marker existed keep their protection."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / rundir.FIT_CONFIG).write_text("{}")
    with pytest.raises(rundir.RunExistsError, match="already holds a run"):
        rundir.prepare_fit(tmp_path, ckpt_path=None, overwrite=False)
    only_config = tmp_path / "early"
    only_config.mkdir()
    (only_config / rundir.FIT_CONFIG).write_text("{}")
    (only_config / rundir.WANDB_ID_FILE).write_text("abc\n")
    rundir.prepare_fit(only_config, ckpt_path=None, overwrite=False)
    assert rundir.previous_run(only_config) == []


def test_a_hub_dataset_of_one_class_is_refused(tmp_path):
    import datasets

    from p4q_lightning.data.hub import HubSource

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["only"])}
    )
    images = [tiny_world._draw((200, 0, 0), "circle", random.Random(i)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 0, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="has only the class 'only', but classification needs"):
        HubSource(str(tmp_path / "saved"))
