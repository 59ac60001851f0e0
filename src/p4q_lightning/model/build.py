"""Building the frozen float teacher the same way every time (so checkpoints need not hold it)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import nn

from p4q_lightning.model.clip import load_clip
from p4q_lightning.seeding import seeded_global_rng

log = logging.getLogger(__name__)


def register_model_config(path: str) -> str:
    """Register an open_clip model-config JSON (its file name is the model name)."""
    config = Path(path).expanduser()
    if not config.is_file() or config.suffix != ".json":
        raise FileNotFoundError(
            f"model_config {path!r} is not an open_clip model-config .json file"
        )
    # (re-)register unless open_clip already holds exactly this config under that name
    if open_clip.get_model_config(config.stem) != json.loads(config.read_text()):
        open_clip.add_model_config(config)
    return config.stem


def build_teacher(
    model_name: str,
    pretrained: str | None,
    model_config: str | None = None,
    init_seed: int = 0,
) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """Return the frozen, eval-mode float CLIP and its tokenizer.

    Random weights (``pretrained=None``) are drawn under ``init_seed`` without touching the
    global RNG, so rebuilding from the same arguments gives bit-identical weights.
    """
    if model_config:
        registered = register_model_config(model_config)
        if registered != model_name:
            raise ValueError(
                f"model_config {model_config!r} registers the model {registered!r}, but "
                f"model_name is {model_name!r}; set model_name to the config's file name"
            )
    with seeded_global_rng(init_seed):
        model, _, tokenizer = load_clip(model_name, pretrained)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def image_feature_dim(model: nn.Module) -> int:
    """Width of the projected image embedding (the adapter's input and output)."""
    visual = getattr(model, "visual", None)
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        proj = getattr(visual, "proj", None)
        if proj is None:
            raise TypeError("cannot tell the image embedding width of this model")
        dim = proj.shape[-1]
    return int(dim)


@torch.no_grad()
def weight_fingerprint(model: nn.Module) -> float:
    """A cheap checksum of a model's parameters (detects a changed pretrained file on load)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        total += (p.detach().double().sum() * (1 + (i % 7))).cpu()
    return float(total)
