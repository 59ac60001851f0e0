"""Fail fast, with the fix, when open_clip weights named by a tag cannot be had.

Without this, an unknown tag is a ``RuntimeError`` deep in open_clip and a missing network is
about a minute of download retries and a long traceback; neither says that a local checkpoint
file works just as well.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

LOCAL_HINT = (
    "to use weights on disk, pass the open_clip checkpoint file instead of a tag: "
    "--model.pretrained /path/to/open_clip_model.safetensors (or .bin/.pt; in Python: "
    "load_clip(name, pretrained='/path/to/file'))"
)
SAFE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can a TCP connection to ``host`` be opened within ``timeout`` seconds (DNS included)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_hub(hf_hub: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    model_id, filename = os.path.split(hf_hub)  # "org/model/" names no file: open_clip's default
    names = [filename] if filename else []
    names += [n for n in SAFE_NAMES if n not in names]
    return any(isinstance(try_to_load_from_cache(model_id, n), str) for n in names)


def check_pretrained_tag(name: str, tag: str) -> None:
    """Raise at once when ``tag`` is unknown for ``name`` or its weights are neither cached
    nor downloadable (the host cannot be reached)."""
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(
            f"pretrained={tag!r} is neither a file nor an open_clip tag of {name} "
            f"(its tags: {known}); {LOCAL_HINT}"
        )
    if "file" in cfg:
        return
    hub = cfg.get("hf_hub", "")
    if hub and _cached_on_hub(hub):
        return
    host = (
        urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        if hub
        else urlparse(cfg.get("url", "")).hostname
    )
    if host and not reachable(host):
        raise ConnectionError(
            f"the {name} weights {tag!r} are not cached and {host} cannot be reached "
            f"(no network?); {LOCAL_HINT}"
        )
