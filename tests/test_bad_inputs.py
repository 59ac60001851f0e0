"""Bad inputs through the command line, in-process: each gets one clear line on stderr and exit
status 1 (the traceback only with P4Q_DEBUG=1), is caught before slow work, and leaves earlier
outputs untouched."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest

import tiny_world
from p4q_lightning import cli

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("P4Q_DEBUG", raising=False)


def config(world, tmp: Path, model: dict | None = None, data: dict | None = None) -> Path:
    model = {"quant_overrides": tiny_world.MINMAX, "features": {"views": 1}, **(model or {})}
    return tiny_world.cli_config(world, tmp / "config.yaml", model=model, data=data)


def folder_data(root: str, **kw) -> dict:
    args = {
        "dataset": root,
        "shots": 2,
        "image_size": 32,
        "num_workers": 0,
        "persistent_workers": False,
        "batch_size": 8,
        "calib_images": 8,
        **kw,
    }
    return {"class_path": "p4q_lightning.data.FewShotDataModule", "init_args": args}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert "P4Q_DEBUG=1" in err
    return lines[0]


def test_invalid_argument_is_one_line_and_debug_shows_the_traceback(
    world, tmp_path, capsys, monkeypatch
):
    cfg = config(world, tmp_path, model={"features": {"views": -1}})
    assert cli.main(["fit", "--config", str(cfg)]) == 1
    assert "features.views=-1: use 0" in one_line_error(capsys)
    monkeypatch.setenv("P4Q_DEBUG", "1")
    with pytest.raises(ValueError, match=r"features\.views=-1"):
        cli.main(["fit", "--config", str(cfg)])


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    fake = tmp_path / "notes.ckpt"
    fake.write_text("these are my notes, not a checkpoint")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")
    assert cli.main(["export", str(fake), "--out", str(out)]) == 1
    assert "is not a readable Lightning checkpoint" in one_line_error(capsys)
    assert out.read_bytes() == b"an earlier export"


def test_export_checks_the_output_path_before_rebuilding_the_model(tmp_path, capsys, monkeypatch):
    from p4q_lightning.module import P4QModule

    def slow_rebuild(*args, **kwargs):
        raise AssertionError("the model was rebuilt before the output path was checked")

    monkeypatch.setattr(P4QModule, "load_from_checkpoint", slow_rebuild)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"unused")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["export", str(ckpt), "--out", str(blocker / "sub" / "m.safetensors")]) == 1
    assert "cannot create the export directory" in one_line_error(capsys)


def test_evaluating_an_untrained_prompt_warns_loudly(world, tmp_path):
    cfg = config(world, tmp_path)
    with pytest.warns(UserWarning, match="UNTRAINED prompt and adapter"):
        assert cli.main(["test", "--config", str(cfg)]) is None
    with pytest.warns(UserWarning, match="UNTRAINED"):  # 'last' with no checkpoint to load
        assert cli.main(["test", "--config", str(cfg), "--ckpt_path", "last"]) is None


@pytest.mark.parametrize(
    ("method", "state"), [("clip_lora", "LoRA factors"), ("tip_adapter_f", "cache keys")]
)
def test_the_untrained_warning_names_what_the_method_fits(world, tmp_path, method, state):
    cfg = config(world, tmp_path, model={"method": method})
    with pytest.warns(UserWarning, match=f"UNTRAINED {state}: .* not {method} results"):
        assert cli.main(["test", "--config", str(cfg)]) is None


def write_flat_folder(root: Path, per_class: int, corrupt: bool = False) -> Path:
    rng = random.Random(0)
    for name, (color, shape) in list(tiny_world.CLASSES.items())[:2]:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if corrupt:
                (folder / f"{i}.png").write_bytes(b"\x89PNG broken")
            else:
                tiny_world._draw(color, shape, rng).save(folder / f"{i}.png")
    return root


def test_a_test_split_with_zero_items_is_an_error(world, tmp_path, capsys):
    root = write_flat_folder(tmp_path / "flat", per_class=4)  # no test folder
    data = folder_data(str(root), shots=4, split_dir=str(tmp_path / "splits"))
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=data)
    assert cli.main(["test", "--config", str(cfg)]) == 1
    assert "would have 0 images; lower data.shots" in one_line_error(capsys)


def test_missing_relative_folder_is_not_mistaken_for_a_hub_id(world, tmp_path, capsys, monkeypatch):
    import p4q_lightning.data.kinds as kinds

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(kinds.HubSource, "from_args", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=folder_data("data/does_not_exist"))
    assert cli.main(["validate", "--config", str(cfg)]) == 1
    assert "does_not_exist does not exist" in one_line_error(capsys)


def test_missing_owner_name_says_both_possibilities(world, tmp_path, capsys, monkeypatch):
    from p4q_lightning.data.hub import HubSource

    def offline(*args, **kwargs):
        raise RuntimeError("could not load the Hugging Face dataset 'someone/thing': offline")

    monkeypatch.setattr(HubSource, "_open", staticmethod(offline))
    monkeypatch.chdir(tmp_path)
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=folder_data("someone/thing"))
    assert cli.main(["validate", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert "is neither a local folder" in line and "nor a loadable hub dataset" in line


def test_calibration_with_only_corrupt_images(world, tmp_path, capsys):
    root = tmp_path / "split"
    write_flat_folder(root / "train", per_class=3, corrupt=True)
    write_flat_folder(root / "val", per_class=2)
    data = folder_data(
        str(root), skip_corrupt=True, in_memory=False, split_dir=str(tmp_path / "splits")
    )
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=data)
    assert cli.main(["validate", "--config", str(cfg)]) == 1
    assert "no calibration image could be read" in one_line_error(capsys)


def test_image_size_that_does_not_fit_the_model(world, tmp_path, capsys):
    root = write_flat_folder(tmp_path / "flat", per_class=6)
    data = folder_data(str(root), image_size=64, split_dir=str(tmp_path / "splits"))
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=data)
    assert cli.main(["validate", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert "resized to 64 pixels" in line and "image_size: 32" in line


class EmptyTestSet(tiny_world.TinyDataModule):
    """A datamodule whose test loader yields nothing (e.g. a filter removed every item)."""

    def test_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader([], batch_size=8)


def test_an_empty_evaluation_loader_is_an_error(world, tmp_path, capsys):
    data = {"class_path": "test_bad_inputs.EmptyTestSet", "init_args": {"root": str(world["data"])}}
    cfg = config(world, tmp_path, model={"method": "ptq"}, data=data)
    assert cli.main(["test", "--config", str(cfg)]) == 1
    assert "the test split has 0 items" in one_line_error(capsys)


def test_a_config_of_the_flat_layout_names_each_options_new_place(world, tmp_path, capsys):
    cfg = config(world, tmp_path)
    text = cfg.read_text().replace("model:\n", "model:\n  n_ctx: 4\n  feature_views: 1\n", 1)
    cfg.write_text(text)
    assert cli.main(["fit", "--config", str(cfg)]) == 1
    line = one_line_error(capsys)
    assert "model.n_ctx -> model.prompt.n_ctx" in line
    assert "model.feature_views -> model.features.views" in line
    assert cli.main(["fit", "--config", str(tmp_path / "none.yaml"), "--model.prompt_lr=0.1"]) == 1
    assert "model.prompt_lr -> model.optim.prompt_lr" in one_line_error(capsys)
