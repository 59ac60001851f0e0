"""Loading open_clip CLIP models by name and pretrained tag, path or nothing."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from p4q_lightning.model.tiny import register_tiny_clip
from p4q_lightning.pretrained_tags import resolve_registered_tag

log = logging.getLogger(__name__)


def _check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown open_clip model {name!r}.{hint} See open_clip.list_models() for all "
            f"{len(known)} names (OpenAI weights need the '-quickgelu' variants, "
            "e.g. ViT-B-32-quickgelu)."
        )


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Map a registered tag (the demo's ``synthetic[:seed]``) to its weights file; check local
    paths and open_clip tags."""
    if pretrained is None or pretrained == "":
        return None
    registered = resolve_registered_tag(pretrained)
    if registered is not None:
        return registered
    looks_like_path = any(s in pretrained for s in ("/", "\\")) or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    )
    if looks_like_path and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {pretrained!r} does not exist: pass an existing file, an "
            f"open_clip tag (see open_clip.list_pretrained_tags_by_model({name!r})), or None"
        )
    if not looks_like_path:
        from p4q_lightning.model.weights import check_pretrained_tag

        check_pretrained_tag(name, pretrained)
    return pretrained


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Callable[..., Any], Callable[..., torch.Tensor]]:
    """Build an open_clip model and return ``(model, eval_preprocess, tokenizer)``.

    ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``), a checkpoint
    path, a tag registered in :mod:`p4q_lightning.pretrained_tags` (the demo registers
    ``"synthetic[:seed]"``, its embedded teacher for ``p4q-tiny``), or None for
    random weights. The model is returned in eval mode.
    """
    if name.startswith("p4q-"):
        register_tiny_clip()
    _check_model_name(name)
    resolved = _resolve_pretrained(name, pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=resolved, device=device
    )
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    log.info("loaded open_clip %s (pretrained=%s)", name, pretrained)
    return model, preprocess, tokenizer
