"""``p4q demo``: a reduced run (short teacher pretraining, fewer epochs and test images).

The teacher is the demo's own (pretrained once, ~2 minutes on 2 cores, then cached in
``$P4Q_CACHE_DIR``, as `make demo` does): a teacher pretrained for fewer steps is too weak for
the comparison to mean anything (at 300 steps it reaches 23 % and distillation from it drags
every trained student down). Training, features and the test split are reduced instead.
"""

from __future__ import annotations

import csv

import pytest

from p4q_lightning.commands import demo


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    overrides = [
        "--model.features.cache_dir", str(root / "features"),
        "--model.features.views", "4",
        "--trainer.max_epochs", "10",
        "--data.init_args.synthetic.test_per_class", "15",
        "--data.init_args.calib_images", "256",
    ]  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        out = root / "out"
        printed = _capture(lambda: demo.main(["--seed", "0", "--out", str(out), "--", *overrides]))
    finally:
        mp.undo()
    return out, printed


def _capture(fn) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert fn() == 0
    return buffer.getvalue()


def test_reduced_demo_p4q_recovers_what_ptq_loses_at_w4a4(reduced_demo) -> None:
    out, _ = reduced_demo
    rows = list(csv.DictReader((out / "demo_results.csv").open()))
    top1 = {(r["method"], r["bits"]): float(r["top1"]) for r in rows}
    assert top1[("ptq", "w4a4")] < top1[("p4q", "w4a4")]


def test_reduced_demo_writes_the_table_the_picture_and_names_them_last(reduced_demo) -> None:
    out, printed = reduced_demo
    csv_path, png_path = out / "demo_results.csv", out / "demo_results.png"
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["method", "bits", "shots", "top1", "top5", "size_mb"]
        rows = list(reader)
    assert [(r["method"], r["bits"]) for r in rows] == demo.ROW_ORDER
    for r in rows:
        assert 0.0 <= float(r["top1"]) <= float(r["top5"]) <= 100.0  # percent
        assert int(r["shots"]) == (16 if r["method"] in ("coop", "p4q") else 0)
    sizes = {(r["method"], r["bits"]): float(r["size_mb"]) for r in rows}
    assert sizes[("p4q", "w4a4")] < sizes[("p4q", "w8a8")] < sizes[("zeroshot", "32")] / 3
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = printed.strip().splitlines()[-2:]
    assert last == [f"CSV:    {csv_path}", f"Figure: {png_path}"]
    assert "zeroshot" in printed and "p4q" in printed
    # every run and the summary logged to W&B (offline)
    assert len(list(out.glob("wandb/offline-run-*"))) == 1
    assert len(list(out.glob("*/wandb/offline-run-*"))) == len(demo.RUNS)


def test_demo_refuses_a_missing_config_and_an_unwritable_output(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="demo config"):
        demo.run_demo(0, tmp_path / "out", config=tmp_path / "missing.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match="cannot write"):
        demo.run_demo(0, blocker / "out")


def test_run_args_tie_world_split_and_training_seed_together(tmp_path) -> None:
    args = demo.run_args(
        3, "p4q", "w4a4", tmp_path, demo.DEMO_CONFIG, ["--trainer.max_epochs", "1"]
    )
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--seed_everything"] == "3"
    assert pairs["--model.pretrained"] == "synthetic:3"
    assert pairs["--data.init_args.dataset"] == "synthetic:3"
    assert pairs["--data.init_args.seed"] == "3"
    assert args[-2:] == ["--trainer.max_epochs", "1"]  # user overrides come last and win
