"""The suite through the command line with the shipped configs, on generated ``$DATA`` folders.

``lightning fit`` then ``lightning test`` of ``experiments/suite/p4q.yaml`` (dataset and
backbone from the command line, the tiny ``p4q-tiny`` model swapped in) on a generated
oxford_pets with dtd as a second test set; zero-shot ``test`` runs for the domain-generalisation
and base-to-novel protocols.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import suite_layouts as layouts

import tiny_world
from p4q_lightning import cli

warnings.filterwarnings("ignore", ".*does not have many workers.*")
SUITE = Path(__file__).resolve().parents[2] / "experiments" / "suite"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def suite_args(tmp_path: Path, method: str, *extra: str, **data: str) -> list[str]:
    """The shipped method config on ViT-B/32, made tiny and CPU-sized from the command line."""
    args = [
        "--config",
        str(SUITE / f"{method}.yaml"),
        "--config",
        str(SUITE / "vitb32.yaml"),
        *extra,
        "--model.model_name=p4q-tiny",
        "--model.pretrained=null",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.root",
        str(tmp_path / "DATA"),
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        "--data.init_args.batch_size=4",
        "--data.init_args.calib_images=8",
        "--data.init_args.split_dir",
        str(tmp_path / "splits"),
        "--run_dir",
        str(tmp_path / "run"),
    ]
    for key, value in data.items():
        args += [f"--data.init_args.{key}", value]
    return args


def comparison(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "run" / "comparison" / "comparison.json").read_text())["rows"]


def test_fit_then_test_writes_both_test_sets_into_the_comparison(tmp_path):
    layouts.write_dataset(tmp_path / "DATA", "oxford_pets")  # 3 classes
    textures = ["banded", "blotchy", "braided", "bubbly"]  # 4: scored with pets' 3 would fail
    counts = {"train": [2] * 4, "val": [1] * 4, "test": [3] * 4}
    layouts.write_split_json(tmp_path / "DATA", "dtd", counts, textures)
    args = suite_args(
        tmp_path,
        "p4q",
        "--model.prompt.n_ctx=4",
        "--model.features.views=1",
        "--model.quant_overrides",
        json.dumps(tiny_world.MINMAX),
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        dataset="oxford_pets",
        shots="2",
        test_datasets="[dtd]",
    )
    cli.cli_main(["fit", *args])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    test = cli.cli_main(["test", *args, "--ckpt_path", "last"])
    rows = comparison(tmp_path)
    by_set = {(r["test_set"], r["method"]): r for r in rows}
    methods = ("fp32 zero-shot", "ptq", "p4q")
    assert set(by_set) == {(s, m) for s in ("oxford_pets", "dtd") for m in methods}
    assert {(r["test_set"], r["n_test"]) for r in rows} == {("oxford_pets", 9), ("dtd", 12)}
    logged = test.trainer.callback_metrics
    # the module's test loop and the comparison score each set alike (own classes, template)
    assert float(logged["test/top1"]) == pytest.approx(by_set[("oxford_pets", "p4q")]["top1"])
    assert float(logged["test/dtd/top1"]) == pytest.approx(by_set[("dtd", "p4q")]["top1"])
    assert "test/dtd/top5" in logged and not any("dataloader_idx" in k for k in logged)
    model = test.model.classifier
    assert model.classnames == ["abyssinian", "american bulldog", "basset hound"]  # restored


def zero_shot_test(tmp_path: Path, *extra: str, **data: str):
    return cli.cli_main(["test", *suite_args(tmp_path, "zeroshot", *extra, **data)])


def test_domain_generalisation_scores_the_subset_with_training_rows(tmp_path):
    for name in ("imagenet", "imagenet_a"):
        layouts.write_dataset(tmp_path / "DATA", name)
    run = zero_shot_test(
        tmp_path,
        "--config",
        str(SUITE / "domain_generalisation.yaml"),
        test_datasets="[imagenet_a]",
    )
    rows = {r["test_set"]: r for r in comparison(tmp_path)}
    assert set(rows) == {"imagenet", "imagenet_a"} and rows["imagenet_a"]["n_test"] == 4
    restricted = float(run.trainer.callback_metrics["test/imagenet_a/top1"])
    assert restricted == pytest.approx(rows["imagenet_a"]["top1"])
    # the training classifier's rows of ImageNet-A's classes score as ImageNet-A's own names do
    (tmp_path / "run").rename(tmp_path / "dg-run")
    own = zero_shot_test(tmp_path, dataset="imagenet_a")
    assert float(own.trainer.callback_metrics["test/top1"]) == pytest.approx(restricted)


def test_base_to_novel_reports_base_new_and_their_harmonic_mean(tmp_path):
    layouts.write_split_json(
        tmp_path / "DATA",
        "eurosat",
        {"train": [3] * 5, "val": [1] * 5, "test": [2] * 5},
        [f"land {c}" for c in range(5)],
    )
    run = zero_shot_test(tmp_path, "--config", str(SUITE / "base_to_novel.yaml"), dataset="eurosat")
    rows = {r["test_set"]: r for r in comparison(tmp_path)}
    assert set(rows) == {"base", "new", "hm"}
    assert (rows["base"]["n_test"], rows["new"]["n_test"]) == (6, 4)  # 3 base, 2 new classes
    b, n = rows["base"]["top1"], rows["new"]["top1"]
    assert rows["hm"]["top1"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    logged = run.trainer.callback_metrics
    assert float(logged["test/new/top1"]) == pytest.approx(n)
    assert not math.isnan(float(logged["test/top1"]))
    assert run.datamodule.classnames == ["land 0", "land 1", "land 2"]
