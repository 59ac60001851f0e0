"""ComparisonCallback: table, figures, W&B offline logging; resolve_wandb_mode."""

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

import tiny_world
from p4q_lightning import wandb_mode
from p4q_lightning.callbacks.compare import ComparisonCallback
from p4q_lightning.module import P4QModule
from p4q_lightning.wandb_mode import resolve_wandb_mode


@pytest.fixture(scope="module")
def fitted(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    module = P4QModule(
        **tiny_world.module_args(world, quant_overrides=tiny_world.MINMAX, features={"views": 1})
    )
    dm = tiny_world.TinyDataModule(str(world["data"]), batch_size=4)
    _trainer(root, [], False).fit(module, datamodule=dm)
    return module, dm


def _trainer(root, callbacks, logger):
    return tiny_world.trainer(
        root,
        logger=logger,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=2,
    )


def _check_outputs(directory: Path, n_test: int, n_classes_seen: int = 4) -> list[dict]:
    with (directory / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fp32 zero-shot", "ptq", "p4q"]
    assert [r["bits"] for r in rows] == ["fp32", "w4a4+custom", "w4a4+custom"]
    assert all(int(r["n_test"]) == n_test for r in rows)
    assert all(0.0 <= float(r["top1"]) <= float(r["top5"]) <= 1.0 for r in rows)
    sizes = [float(r["size_mb"]) for r in rows]
    assert sizes[0] > 3 * sizes[1] and sizes[2] >= sizes[1]
    for png in ("accuracy.png", "similarity.png"):
        data = (directory / png).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((directory / "comparison.json").read_text())
    labels = payload["similarity"]["labels"]
    n = n_classes_seen
    assert len(labels) == len(set(labels)) == n  # one image per class seen
    assert len(payload["similarity"]["p4q"]) == n and len(payload["similarity"]["p4q"][0]) == n
    return rows


def test_comparison_without_wandb_writes_csv_json_pngs(fitted, tmp_path) -> None:
    module, dm = fitted
    cb = ComparisonCallback(wandb_fallback=False)
    _trainer(tmp_path, [cb], False).test(module, datamodule=dm)
    _check_outputs(tmp_path / "comparison", len(dm.test_dataset))
    assert cb.rows[2]["method"] == "p4q"


def test_wandb_offline_run_holds_the_table(fitted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    module, dm = fitted
    logger = WandbLogger(save_dir=str(tmp_path / "wandb-dir"), project="p4q-test")
    cb = ComparisonCallback(max_batches=2)
    _trainer(tmp_path, [cb], logger).test(module, datamodule=dm)
    logger.experiment.finish()
    run_dirs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    tables = list(run_dirs[0].rglob("*.table.json"))
    assert tables, "no W&B table in the offline run"
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["method", "bits"]
    assert [row[0] for row in table["data"]] == ["fp32 zero-shot", "ptq", "p4q"]
    assert list(run_dirs[0].rglob("*.png")), "no figures in the offline run"
    # the CSV/PNGs are written into the run directory as well
    found = list(tmp_path.rglob("comparison/comparison.csv"))
    assert found
    _check_outputs(found[0].parent, 8, n_classes_seen=2)  # 2 batches of 4 sorted images


def test_resolve_wandb_mode(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode() == "offline"
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb_mode, "_reachable", lambda timeout=3.0: False)
    assert resolve_wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(wandb_mode, "_reachable", lambda timeout=3.0: True)
    assert resolve_wandb_mode() == "online"


def test_unreachable_probe_is_bounded(monkeypatch) -> None:
    import time

    monkeypatch.setenv("WANDB_BASE_URL", "http://192.0.2.1:9")  # TEST-NET-1: never answers
    start = time.perf_counter()
    assert wandb_mode._reachable(timeout=0.5) is False
    assert time.perf_counter() - start < 2.0


def test_bad_option() -> None:
    with pytest.raises(ValueError, match="after="):
        ComparisonCallback(after="never", wandb_fallback=False)
