"""``p4q export`` and ``p4q compare`` through the CLI entry point."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

import tiny_world
from p4q_lightning.args import _FLAT_NAMES, GROUPS
from p4q_lightning.cli import main as cli_main  # noqa: E402
from p4q_lightning.export import load_lowbit  # noqa: E402
from p4q_lightning.module import P4QModule  # noqa: E402


def _fake_run(
    root: Path, name: str, bits: int, shots: int, seed: int, top1: float, dataset: str = "inet"
) -> Path:
    run = root / name / "comparison"
    run.mkdir(parents=True)
    label = f"w{bits}a{bits}"
    rows = [
        {
            "method": "fp32 zero-shot",
            "bits": "fp32",
            "w_bits": 32,
            "a_bits": 32,
            "shots": 0,
            "top1": 0.6 + seed / 100,
            "top5": 0.9,
            "size_mb": 600.0,
            "n_test": 100,
        },
        {
            "method": "ptq",
            "bits": label,
            "w_bits": bits,
            "a_bits": bits,
            "shots": 0,
            "top1": 0.3 + bits / 100,
            "top5": 0.7,
            "size_mb": 600.0 / (32 / bits),
            "n_test": 100,
        },
        {
            "method": "p4q",
            "bits": label,
            "w_bits": bits,
            "a_bits": bits,
            "shots": shots,
            "top1": top1,
            "top5": 0.95,
            "size_mb": 600.0 / (32 / bits),
            "n_test": 100,
        },
    ]
    info = {"model": "ViT-B-32", "dataset": dataset, "shots": shots, "seed": seed}
    (run / "comparison.json").write_text(json.dumps({"run": info, "rows": rows}))
    return root / name


def _sweep(root: Path) -> list[Path]:
    return [
        _fake_run(root, f"b{b}-s{s}-seed{seed}", b, s, seed, 0.5 + b / 100 + s / 100 + seed / 1000)
        for b in (4, 8)
        for s in (1, 16)
        for seed in (1, 2)
    ]


def _summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_compare_gathers_runs_into_one_table_and_plot(tmp_path, capsys) -> None:
    runs = _sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert (
        cli_main(["compare", *map(str, runs[:4]), str(tmp_path / "sweep"), "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "| dataset | model | shots | method | bits | seeds | top-1 (%) |" in text
    summary = _summary(out)
    p4q = [r for r in summary if r["method"] == "p4q"]
    assert len(p4q) == 4  # 2 bit widths x 2 shot counts, seeds averaged
    assert {int(r["seeds"]) for r in summary} == {2}  # runs named twice count once
    row = next(r for r in p4q if r["bits"] == "w8a8" and r["shots"] == "16")
    assert float(row["top1"]) == pytest.approx(0.5 + 0.08 + 0.16 + 0.0015)
    assert float(row["top1_std"]) == pytest.approx(statistics.stdev([0.001, 0.002]))
    assert "74.15 ± 0.07" in text  # mean ± std over the two seeds, in percent
    # the float zero-shot row: once per seed in each experiment, not once per run
    zero = [r for r in summary if r["method"] == "fp32 zero-shot"]
    assert [(r["experiment_shots"], r["seeds"]) for r in zero] == [("1", "2"), ("16", "2")]
    with (out / "sweep.csv").open() as f:  # 2 shots x 2 seeds x (zero-shot + 2 PTQ + 2 P4Q)
        assert len(list(csv.DictReader(f))) == 2 * 2 * 5
    assert (out / "summary.md").read_text() in text
    png = (out / "sweep.png").read_bytes()
    assert len(png) > 1000 and png[:4] == b"\x89PNG"


def test_compare_takes_globs_skips_non_runs_and_groups_by_dataset(tmp_path, capsys, caplog):
    root = tmp_path / "runs"
    _sweep(root)
    _fake_run(root, "cifar-b4-s16-seed1", 4, 16, 1, 0.7, dataset="cifar")
    (root / "config.yaml").write_text("trainer: {}\n")  # what `runs/*` also expands to
    (root / "broken" / "comparison").mkdir(parents=True)
    (root / "broken" / "comparison" / "comparison.json").write_text("{not json")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="p4q_lightning"):
        code = cli_main(["compare", str(root / "*"), str(root / "config.yaml"), "--out", str(out)])
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 2 path(s)" in warnings[0]
    assert "config.yaml" in warnings[0] and "broken" in warnings[0]
    summary = _summary(out)
    cifar = [r for r in summary if r["dataset"] == "cifar"]
    assert {r["method"] for r in cifar} == {"fp32 zero-shot", "ptq", "p4q"}
    assert all(r["seeds"] == "1" for r in cifar)  # not averaged into the ImageNet rows
    assert "9 runs" in capsys.readouterr().out
    with (out / "sweep.csv").open() as f:  # each row names its run directory, not "runs"
        named = {r["run"] for r in csv.DictReader(f)}
    assert str(root / "cifar-b4-s16-seed1") in named and str(root) not in named


def test_compare_errors(tmp_path) -> None:
    with pytest.raises(SystemExit):
        cli_main(["compare", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        cli_main(["compare", str(tmp_path)])  # exists but holds no results


def test_export_command_from_checkpoint(tmp_path, capsys) -> None:
    config = tiny_world.write_model_config(tmp_path / "cfg")
    data = tiny_world.write_image_folder(tmp_path / "data")
    module = P4QModule(
        model_name=tiny_world.MODEL_NAME,
        pretrained=None,
        model_config=str(config),
        quant="w8a8",
        quant_overrides=tiny_world.MINMAX,
        prompt={"n_ctx": 4},
        features={"views": 1},
    )
    dm = tiny_world.TinyDataModule(str(data))
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "p4q.ckpt"
    trainer.save_checkpoint(ckpt)
    assert cli_main(["export", str(ckpt), "--verify"]) == 0
    out = tmp_path / "p4q-lowbit.safetensors"
    assert "verified: 4 classes" in capsys.readouterr().out
    images = torch.stack([dm.val_dataset[i][0] for i in range(8)])
    module.eval()
    with torch.no_grad():
        ref = module.classifier.student_logits(images)
    got = load_lowbit(out).logits(images)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_path / "missing.ckpt")])

    # A checkpoint of the earlier layout (flat hyperparameters, no ``classifier.`` prefix)
    # exports the same model.
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    old["hyper_parameters"] = _flat(old["hyper_parameters"])
    old["state_dict"] = {k.removeprefix("classifier."): v for k, v in old["state_dict"].items()}
    assert "n_ctx" in old["hyper_parameters"] and "prompt_learner.ctx" in old["state_dict"]
    torch.save(old, tmp_path / "old.ckpt")
    assert cli_main(["export", str(tmp_path / "old.ckpt")]) == 0
    assert torch.equal(load_lowbit(tmp_path / "old-lowbit.safetensors").logits(images), got)


def _flat(hparams: dict) -> dict:
    """Hyperparameters as versions before the option groups wrote them."""
    flat = {k: v for k, v in hparams.items() if k not in GROUPS}
    for old, (group, field) in _FLAT_NAMES.items():
        flat[old] = hparams[group][field]
    flat["adapter"] = hparams["adapter"]["enabled"]
    return flat
