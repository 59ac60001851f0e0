"""Run directories: one per run, derived from the config; refuse / resume / overwrite on re-run;
``test --ckpt_path last`` finds the fit's checkpoint; W&B identity and one W&B run for fit+test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import wandb

import wandb_records
from p4q_lightning import cli, rundir
from test_cli import tiny_config

WANDB = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "p4q-test"},
}
EXPORT = {"class_path": "p4q_lightning.callbacks.LowBitExportCallback"}


def run_dir(root: Path, quant: str = "w4a4", seed: int = 0) -> Path:
    return root / "data" / "tiny-test-vit" / f"p4q-{quant}" / f"allshot-seed{seed}"


def test_identity_names_dataset_model_method_bits_shots_seed():
    config = {
        "seed_everything": 2,
        "model": {"model_name": "ViT-B-32", "method": "p4q", "quant": "w4a4"},
        "data": {"init_args": {"dataset": "ILSVRC/imagenet-1k", "shots": 16, "seed": 2}},
        "trainer": {"default_root_dir": None},
    }
    assert rundir.run_directory(config) == Path("runs/imagenet-1k/ViT-B-32/p4q-w4a4/16shot-seed2")
    coop = {**config, "model": {**config["model"], "method": "coop"}}
    assert rundir.identity(coop).bits == "fp32"
    ptq = {**config, "model": {**config["model"], "method": "ptq"}}
    assert rundir.identity(ptq).wandb_group == rundir.identity(config).wandb_group  # side by side
    assert rundir.run_directory(ptq) != rundir.run_directory(config)
    other_split = {**config, "data": {"init_args": {**config["data"]["init_args"], "seed": 3}}}
    assert rundir.identity(other_split).seed == "2-split3"
    ident = rundir.identity(config)
    assert ident.wandb_group == "imagenet-1k-ViT-B-32-16shot"
    assert {"p4q", "w4a4", "16shot", "seed2"} <= set(ident.wandb_tags)


def test_quant_and_seed_runs_write_disjoint_directories(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = str(tiny_config(world, tmp_path))
    runs = [
        ([], run_dir(tmp_path)),
        (["--model.quant", "w8a8"], run_dir(tmp_path, "w8a8")),
        (["--seed_everything", "1"], run_dir(tmp_path, seed=1)),
    ]
    for extra, expected in runs:
        fit = cli.cli_main(["fit", "--config", config, *extra])
        assert Path(fit.trainer.default_root_dir) == expected
        assert (expected / "config.yaml").is_file()
        assert (expected / "checkpoints" / "last.ckpt").is_file()
    # each run's files are its own: nothing written outside the three run directories
    owned = {p for _, d in runs for p in d.rglob("*")} | {d for _, d in runs}
    written = {p for p in (tmp_path / "data" / "tiny-test-vit").rglob("*") if p.is_file()}
    assert written <= owned


def test_refit_refuses_then_resumes_or_overwrites(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = str(tiny_config(world, tmp_path))
    cli.cli_main(["fit", "--config", config])
    before = (run_dir(tmp_path) / "config.yaml").read_bytes()
    with pytest.raises(rundir.RunExistsError, match="--ckpt_path last.*--overwrite true"):
        cli.cli_main(["fit", "--config", config])
    assert (run_dir(tmp_path) / "config.yaml").read_bytes() == before  # nothing touched
    resumed = cli.cli_main(["fit", "--config", config, "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    cli.cli_main(["fit", "--config", config, "--overwrite", "true"])
    assert (run_dir(tmp_path) / "checkpoints" / "last.ckpt").is_file()


def test_resuming_a_run_without_checkpoints_is_refused(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = str(tiny_config(world, tmp_path, enable_checkpointing=False))
    cli.cli_main(["fit", "--config", config])
    with pytest.raises(rundir.RunExistsError, match="no checkpoints/last.ckpt to resume"):
        cli.cli_main(["fit", "--config", config, "--ckpt_path", "last"])


def test_test_with_ckpt_path_last_finds_the_fit_run(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = str(tiny_config(world, tmp_path))
    cli.cli_main(["fit", "--config", config])
    test = cli.cli_main(["test", "--config", config, "--ckpt_path", "last"])
    assert test.trainer.ckpt_path == str(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert (run_dir(tmp_path) / "config-test.yaml").is_file()  # fit's config.yaml kept apart


def _by_kind(files: list[Path]) -> dict[str, list]:
    found: dict[str, list] = {}
    for f in files:
        for record in wandb_records.records(f):
            kind = record.WhichOneof("record_type")
            found.setdefault(kind, []).append(getattr(record, kind))
    return found


def test_wandb_fit_then_test_is_one_named_grouped_run_with_config_and_export(
    world, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = str(tiny_config(world, tmp_path, logger=WANDB, callbacks=[EXPORT]))
    for step in (["fit"], ["test", "--ckpt_path", "last"]):
        cli.cli_main([*step, "--config", config])
        wandb.finish()  # what the end of each command's process does
    directory = run_dir(tmp_path)
    files = wandb_records.run_files(directory)
    assert len(files) == 2  # one offline segment per process step; `wandb sync` joins them
    found = _by_kind(files)
    run_id = (directory / rundir.WANDB_ID_FILE).read_text().strip()
    assert {r.run_id for r in found["run"]} == {run_id}
    fit_run = found["run"][0]
    assert fit_run.display_name == "p4q-w4a4-allshot-seed0"
    assert fit_run.run_group == "data-tiny-test-vit-allshot"
    assert fit_run.job_type == "fit"
    assert {"p4q", "w4a4", "seed0"} <= set(fit_run.tags)
    logged = {
        item.key: json.loads(item.value_json)
        for record in found.get("config", []) + [r.config for r in found["run"]]
        for item in record.update
    }
    assert logged["seed_everything"] == 0
    assert logged["trainer"]["max_epochs"] == 1
    assert logged["model"]["quant"] == "w4a4"
    assert "data" in logged
    artifacts = found["artifact"]
    assert [a.type for a in artifacts] == ["model"]
    assert any(f.path == "model-lowbit.safetensors" for f in artifacts[0].manifest.contents)


def test_predict_writes_top5_predictions_into_the_run_directory(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = str(tiny_config(world, tmp_path))
    cli.cli_main(["fit", "--config", config])
    pred = cli.cli_main(["predict", "--config", config, "--ckpt_path", "last"])
    with (run_dir(tmp_path) / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    dataset = pred.trainer.predict_dataloaders.dataset
    assert len(rows) == len(dataset)
    k = min(5, len(pred.model.classifier.classnames))
    assert list(rows[0]) == ["image", "target"] + [f"pred_{i}" for i in range(1, k + 1)] + [
        f"score_{i}" for i in range(1, k + 1)
    ]
    assert rows[0]["image"] == str(dataset.samples[0][0])  # an image file, not a position
    logits = torch.cat([p["logits"] for p in pred.trainer.predict_loop.predictions])
    names = pred.model.classifier.classnames
    assert [r["pred_1"] for r in rows] == [names[i] for i in logits.argmax(-1).tolist()]
    for r in rows:
        scores = [float(r[f"score_{i}"]) for i in range(1, k + 1)]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
