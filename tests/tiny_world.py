"""A tiny open_clip config and a generated image-folder world for fast P4Q tests.

Stand-in for the real FewShotDataModule / synthetic teacher: random-weight CLIP (embed 32,
2 layers, 32x32 images, context 16) and a few coloured shapes per class on disk.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from p4q_lightning.data.feature_serving import FeatureServing
from p4q_lightning.data.seeded import seeded_train_loader
from p4q_lightning.legacy import group_flat_hparams

MODEL_NAME = "tiny-test-vit"
# min-max activation ranges: fast calibration (OMSE's shrink search is what makes it slow)
MINMAX = {
    g: {"a_observer": "minmax"}
    for g in (
        "patch_embed",
        "attn_qkv",
        "attn_out",
        "attn_internals",
        "mlp_fc",
        "mlp_proj",
        "adapter",
    )
}
CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = {
    "red circle": ((220, 40, 40), "circle"),
    "blue square": ((40, 60, 220), "square"),
    "green triangle": ((40, 180, 60), "triangle"),
    "yellow cross": ((230, 210, 30), "cross"),
}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def module_args(world: dict, **overrides: Any) -> dict[str, Any]:
    """``P4QModule`` arguments for the tiny model (w4a4, 4 context vectors), with overrides.

    Grouped options may be given by their flat names (``n_ctx=2``, ``feature_views=0``); they
    go into their group (``prompt``, ``features``...) as in :func:`group_flat_hparams`."""
    return group_flat_hparams(
        {
            "model_name": MODEL_NAME,
            "pretrained": None,
            "model_config": str(world["config"]),
            "quant": "w4a4",
            "prompt": {"n_ctx": 4},
            **overrides,
        }
    )


def trainer(root: Path | str, **overrides: Any) -> Trainer:
    """A quiet one-epoch CPU ``Trainer`` writing under ``root`` (no logger, progress bar,
    model summary or checkpoints), with overrides."""
    args: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
    }
    args.update(overrides)
    return Trainer(**args)


def cli_config(
    world: dict,
    path: Path,
    trainer: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write a LightningCLI YAML that fits the tiny model on the tiny world (CPU, one epoch, no
    logger, seed 0, run root beside ``path``): ``trainer``/``model`` entries override those
    defaults, ``data`` replaces the data section."""
    body = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path.parent),
            "logger": False,
            **(trainer or {}),
        },
        "model": module_args(world, **(model or {})),
        "data": data
        or {"class_path": "tiny_world.TinyDataModule", "init_args": {"root": str(world["data"])}},
    }
    path.write_text(yaml.safe_dump(body))
    return path


def write_model_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(CONFIG))
    return path


def _draw(color: tuple[int, int, int], shape: str, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (32, 32), bg)
    d = ImageDraw.Draw(img)
    s = rng.randint(9, 14)
    x, y = rng.randint(1, 31 - s), rng.randint(1, 31 - s)
    box = (x, y, x + s, y + s)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=color)
    else:
        d.rectangle((x + s // 3, y, x + 2 * s // 3, y + s), fill=color)
        d.rectangle((x, y + s // 3, x + s, y + 2 * s // 3), fill=color)
    return img


def write_image_folder(
    root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0
) -> Path:
    rng = random.Random(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name, (color, shape) in CLASSES.items():
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw(color, shape, rng).save(folder / f"{i}.png")
    return root


class TinyDataModule(FeatureServing, LightningDataModule):
    """ImageFolder train/val splits with the attributes P4QModule reads from FewShotDataModule,
    serving cached features for training as FewShotDataModule does."""

    def __init__(
        self, root: str, batch_size: int = 8, num_workers: int = 0, calibration_images: int = 16
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers = Path(root), batch_size, num_workers
        self.calibration_images = calibration_images
        norm = transforms.Normalize(MEAN, STD)
        self.train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(32, scale=(0.6, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
        self.eval_tf = transforms.Compose([transforms.ToTensor(), norm])

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = datasets.ImageFolder(self.root / "train", self.train_tf)
        self.val_dataset = datasets.ImageFolder(self.root / "val", self.eval_tf)
        self.test_dataset = self.val_dataset
        self.classnames = [c.replace("_", " ") for c in self.train_dataset.classes]
        self.templates = ["a photo of a {}.", "a {}."]
        self.num_classes = len(self.classnames)

    def train_dataloader(self) -> DataLoader:
        return self.serve(
            seeded_train_loader(
                self.train_dataset, self.batch_size, self.trainer, num_workers=self.num_workers
            )
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_dataset, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        calib = datasets.ImageFolder(self.root / "train", self.eval_tf)
        n = min(self.calibration_images, len(calib))
        return DataLoader(
            Subset(calib, list(range(0, len(calib), max(1, len(calib) // n)))[:n]), self.batch_size
        )


def random_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class RankAgreement(Callback):
    """At the end of fit, records (from rank zero) whether every rank holds the same
    calibration, prompt and adapter, plus the synchronised validation accuracy."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = pl_module.state_dict()
        flat = torch.cat([state[k].detach().double().flatten() for k in sorted(state)])
        weights = torch.arange(flat.numel(), dtype=torch.float64) % 97 + 1
        digest = torch.stack([flat.sum(), (flat * weights).sum()])
        gathered = trainer.strategy.all_gather(digest)
        if trainer.is_global_zero:
            result = {
                "world_size": trainer.world_size,
                "agree": bool((gathered == gathered[0]).all()),
                "global_step": trainer.global_step,
                "val_top1": float(trainer.callback_metrics.get("val/top1", -1)),
            }
            Path(self.out).write_text(json.dumps(result))
