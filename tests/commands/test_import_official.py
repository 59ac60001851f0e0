"""``p4q import-official``: the official release's two files, built here in exactly its layout
(``torch.save({"model_state_dict": OrderedDict(...)})``, tiny widths), become a checkpoint that
holds exactly their context vectors and adapter weights, calibrated as every run is, and that
``lightning test --ckpt_path`` evaluates. Files that need code to unpickle, non-finite tensors
and shapes that do not fit the config are refused in one line before anything is written."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import tiny_world
from p4q_lightning import cli
from p4q_lightning.commands.import_official import CHECKPOINT_NAME, ORIGIN_FILE, read_release

warnings.filterwarnings("ignore", ".*does not have many workers.*")

N_CTX, WIDTH, EMBED, CLASSES, CONTEXT_LENGTH = 4, 64, 32, 4, 16  # tiny_world's model and data


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("P4Q_DEBUG", raising=False)


def release_files(
    tmp: Path,
    n_ctx: int = N_CTX,
    width: int = WIDTH,
    classes: int = CLASSES,
    hidden: int = EMBED // 4,
    prefix: str = "",
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The release's two files as the official code saves them (``save_params``)."""
    g = torch.Generator().manual_seed(7)
    prompt = OrderedDict(
        ctx=0.02 * torch.randn(1, n_ctx, width, generator=g),
        token_prefix=torch.randn(classes, 1, width, generator=g),
        token_suffix=torch.randn(classes, CONTEXT_LENGTH - 1 - n_ctx, width, generator=g),
    )
    adapter = OrderedDict()
    adapter["fc.in_fc.weight"] = 0.1 * torch.randn(hidden, EMBED, generator=g)
    adapter["fc.in_fc.bias"] = 0.1 * torch.randn(hidden, generator=g)
    adapter["fc.out_fc.weight"] = 0.1 * torch.randn(EMBED, hidden, generator=g)
    adapter["fc.out_fc.bias"] = 0.1 * torch.randn(EMBED, generator=g)
    tmp.mkdir(parents=True, exist_ok=True)
    p, a = tmp / "p4q_prompt_learner.pth", tmp / "p4q_adapter.pth"
    torch.save({"model_state_dict": OrderedDict((prefix + k, v) for k, v in prompt.items())}, p)
    torch.save({"model_state_dict": OrderedDict((prefix + k, v) for k, v in adapter.items())}, a)
    return p, a, {**prompt, **adapter}


def tiny_config(world, tmp: Path) -> Path:
    model = {"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}}
    return tiny_world.cli_config(world, tmp / "config.yaml", model=model)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def import_official(cfg: Path, prompt: Path, adapter: Path, run: Path, *extra: str):
    argv = ["import-official", "--config", str(cfg), "--prompt", str(prompt)]
    return cli.main([*argv, "--adapter", str(adapter), "--run_dir", str(run), *extra])


def test_the_release_becomes_a_checkpoint_that_lightning_test_evaluates(world, tmp_path, capsys):
    from p4q_lightning.callbacks.calibration import NonEmptyBatches
    from p4q_lightning.module import P4QModule

    prompt, adapter, tensors = release_files(tmp_path / "release")
    cfg, run = tiny_config(world, tmp_path), tmp_path / "imported"
    assert import_official(cfg, prompt, adapter, run) == 0
    ckpt = run / "checkpoints" / CHECKPOINT_NAME
    out = capsys.readouterr().out
    assert f"wrote {ckpt}" in out and f"--ckpt_path {ckpt}" in out
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    # exactly the release's context vectors and adapter weights
    assert torch.equal(state["classifier.prompt_learner.ctx"], tensors["ctx"][0])
    for ours, theirs in [("fc1.weight", "fc.in_fc.weight"), ("fc1.bias", "fc.in_fc.bias")] + [
        ("fc2.weight", "fc.out_fc.weight"),
        ("fc2.bias", "fc.out_fc.bias"),
    ]:
        assert torch.equal(state[f"classifier.adapter.{ours}"], tensors[theirs]), ours
    assert saved["p4q"]["calibrated"] and (run / ORIGIN_FILE).is_file()

    # the ranges are those every run calibrates: CalibrationCallback's path, release loaded
    reference = P4QModule(**saved["hyper_parameters"])
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup("test")
    reference.set_classes(dm.classnames, dm.templates)
    reference.load_state_dict(
        {k: state[k] for k in state if ".prompt_learner." in k or k.endswith(("weight", "bias"))},
        strict=False,
    )
    model = reference.classifier
    model.calibrate(NonEmptyBatches(dm.calibration_dataloader()), model.calibration_texts(), False)
    ranges = {k: v for k, v in reference.state_dict().items() if "quantizer" in k}
    assert any(".adapter.fc2.input_quantizer.range_max" in k for k in ranges)
    for key, value in ranges.items():
        assert torch.equal(state[key], value), key

    # the printed `lightning test --ckpt_path` evaluates it as a trained P4Q checkpoint
    command = out.split("evaluate it: lightning ", 1)[1].split()
    assert command == [
        "test",
        "--config",
        str(cfg),
        "--ckpt_path",
        str(ckpt),
        "--run_dir",
        str(run),
    ]
    evaluate(command, capsys)


def evaluate(command: list[str], capsys) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(command) is None
    assert not [w for w in caught if "UNTRAINED" in str(w.message)]
    assert "test/top1" in capsys.readouterr().out


def test_overrides_are_kept_in_the_run_and_the_printed_command(world, tmp_path, capsys):
    prompt, adapter, tensors = release_files(tmp_path / "release")
    cfg, run = tiny_config(world, tmp_path), tmp_path / "imported"
    assert import_official(cfg, prompt, adapter, run, "--model.logit_scale", "50") == 0
    out = capsys.readouterr().out
    ckpt = run / "checkpoints" / CHECKPOINT_NAME
    command = out.split("evaluate it: lightning ", 1)[1].split()
    assert command == ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)]
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["logit_scale"] == 50.0
    evaluate(command, capsys)
    assert (run / "config-test.yaml").is_file()  # the evaluation ran in the import's run


def test_module_prefixes_of_data_parallel_are_accepted(tmp_path):
    plain = read_release(*release_files(tmp_path / "plain")[:2])
    wrapped = read_release(*release_files(tmp_path / "dp", prefix="module.")[:2])
    assert plain.state_dict().keys() == wrapped.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value), key


class WritesAFile:
    """A pickle whose loading would run code (here: create a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("which", ["prompt", "adapter"])
def test_a_file_that_needs_code_to_unpickle_is_refused_and_runs_nothing(
    world, tmp_path, capsys, which
):
    prompt, adapter, _ = release_files(tmp_path / "release")
    marker = tmp_path / "ran.txt"
    evil = prompt if which == "prompt" else adapter
    torch.save({"model_state_dict": {"ctx": WritesAFile(marker)}}, evil)
    run = tmp_path / "run"
    assert import_official(tiny_config(world, tmp_path), prompt, adapter, run) == 1
    line = one_line_error(capsys)
    assert f"{evil} needs code to unpickle" in line and "nothing in it ran" in line
    assert not marker.exists() and not run.exists()


def test_non_finite_release_tensors_are_refused(world, tmp_path, capsys):
    prompt, adapter, _ = release_files(tmp_path / "release")
    payload = torch.load(adapter, weights_only=True)
    payload["model_state_dict"]["fc.out_fc.weight"][0, 0] = float("nan")
    torch.save(payload, adapter)
    assert import_official(tiny_config(world, tmp_path), prompt, adapter, tmp_path / "r") == 1
    line = one_line_error(capsys)
    assert f"checkpoint {adapter} holds NaN or inf in 1 tensor(s): fc.out_fc.weight" in line
    assert "download it again" in line


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (
            {"n_ctx": 3},
            "the release has 3 context vectors but the config builds 4; set --model.prompt.n_ctx 3",
        ),
        (
            {"classes": 5},
            "the release was trained for 5 classes (its token_prefix) but the dataset has 4",
        ),
        (
            {"hidden": 16},
            "the release's adapter has 16 hidden units but "
            "model.adapter.reduction=4 gives 8; set --model.adapter.reduction 2",
        ),
        (
            {"width": 32},
            "the release's context vectors are 32 wide but tiny-test-vit's token embeddings are 64",
        ),
    ],
)
def test_shapes_that_do_not_fit_are_one_error_each(world, tmp_path, capsys, shape, expected):
    prompt, adapter, _ = release_files(tmp_path / "release", **shape)
    run = tmp_path / "run"
    assert import_official(tiny_config(world, tmp_path), prompt, adapter, run) == 1
    assert expected in one_line_error(capsys)
    assert not (run / "checkpoints").exists()


def test_an_import_is_not_overwritten_without_asking(world, tmp_path, capsys):
    prompt, adapter, _ = release_files(tmp_path / "release")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / CHECKPOINT_NAME).write_bytes(b"an earlier import")
    assert import_official(tiny_config(world, tmp_path), prompt, adapter, run) == 1
    assert f"{run} already holds a run" in one_line_error(capsys)
    assert (run / "checkpoints" / CHECKPOINT_NAME).read_bytes() == b"an earlier import"


def test_the_command_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "import-official" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["import-official", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--prompt" in text and "--adapter" in text and "--config" in text
