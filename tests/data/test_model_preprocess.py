"""Image size, mean, std and interpolation come from the model's own preprocessing config, not
OpenAI CLIP's hard-coded values (a SigLIP or a 336-pixel model must get its own)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN
from open_clip.model import get_model_preprocess_cfg
from torchvision.transforms import v2

import tiny_world
from p4q_lightning import cli
from p4q_lightning.data import transforms
from p4q_lightning.data.transforms import model_preprocess

NAME = "tiny-pp-vit"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def pp_config(tmp_path_factory):
    config = copy.deepcopy(tiny_world.CONFIG)
    config["vision_cfg"]["image_size"] = 48
    path = tmp_path_factory.mktemp("ppcfg") / f"{NAME}.json"
    path.write_text(json.dumps(config))
    return path


def test_matches_what_open_clip_builds_the_model_with(pp_config):
    found = model_preprocess(NAME, None, str(pp_config))
    model = open_clip.create_model(NAME, pretrained=None)
    built = get_model_preprocess_cfg(model)
    assert found["image_size"] == 48 and tuple(built["size"]) == (48, 48)
    assert found["mean"] == pytest.approx(built["mean"])
    assert found["std"] == pytest.approx(built["std"])
    assert found["interpolation"] == built["interpolation"]


@pytest.mark.parametrize(
    "name,tag,size,mean",
    [
        ("ViT-B-32-quickgelu", "openai", 224, OPENAI_DATASET_MEAN),
        ("ViT-L-14-336-quickgelu", "openai", 336, OPENAI_DATASET_MEAN),
        ("ViT-B-16-SigLIP", "webli", 224, (0.5, 0.5, 0.5)),
    ],
)
def test_pretrained_tags_bring_their_own_size_and_normalisation(name, tag, size, mean):
    found = model_preprocess(name, tag)  # configs only: nothing is downloaded
    assert found["image_size"] == size
    assert found["mean"] == pytest.approx(mean)
    assert found["std"] == pytest.approx(open_clip.get_pretrained_cfg(name, tag)["std"])


def _config(world, pp_config, tmp_path) -> str:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path)},
        "model": {"model_name": NAME, "pretrained": None, "model_config": str(pp_config)},
        "data": {
            "class_path": "p4q_lightning.data.FewShotDataModule",
            "init_args": {
                "dataset": str(world["data"]),
                "shots": 2,
                "num_workers": 0,
                "persistent_workers": False,
                "split_dir": str(tmp_path / "splits"),
            },
        },
    }
    path = tmp_path / "pp.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_cli_sizes_images_for_the_model(world, pp_config, tmp_path):
    dm = cli.cli_main(["--config", _config(world, pp_config, tmp_path)], run=False).datamodule
    assert dm.image_size == 48  # the model's, not a hard-coded 224
    dm.setup("fit")
    image, _ = dm.train_dataset[0]
    assert image.shape == (3, 48, 48)


def test_the_cli_normalises_with_the_models_mean_std_and_interpolation(
    world, pp_config, tmp_path, monkeypatch
):
    """Weights with their own normalisation (as SigLIP's) reach the datamodule's transforms;
    explicit data arguments still win."""
    siglip_like = {"image_size": 48, "mean": MEAN, "std": STD, "interpolation": "bilinear"}
    monkeypatch.setattr(transforms, "model_preprocess", lambda *args: siglip_like)
    config = _config(world, pp_config, tmp_path)
    dm = cli.cli_main(["--config", config], run=False).datamodule
    assert dm.mean == pytest.approx(MEAN) and dm.std == pytest.approx(STD)
    dm.setup("fit")
    steps = dm.train_dataset.transform.transforms
    norm = next(t for t in steps if isinstance(t, v2.Normalize))
    assert norm.mean == pytest.approx(MEAN) and norm.std == pytest.approx(STD)
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    assert crop.interpolation == v2.InterpolationMode.BILINEAR
    explicit = cli.cli_main(
        ["--config", config, "--data.init_args.mean", "[0.1, 0.2, 0.3]"], run=False
    ).datamodule
    assert explicit.mean == pytest.approx((0.1, 0.2, 0.3)) and explicit.std == pytest.approx(STD)
