"""The packaged ``p4q-tiny`` open_clip config (the demo teacher's architecture), registered.

A leaf module: :mod:`p4q_lightning.model.clip` registers the config before building a
``p4q-*`` model, and :mod:`p4q_lightning.demo.teacher` pretrains that model, without either
importing the other's module at load time.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

TINY_MODEL_NAME = "p4q-tiny"
TINY_CONFIG_PATH = Path(__file__).parent / "configs" / f"{TINY_MODEL_NAME}.json"


def register_tiny_clip() -> str:
    """Register the packaged ``p4q-tiny`` config with open_clip (idempotent); return its name."""
    if TINY_MODEL_NAME not in open_clip.list_models():
        if not TINY_CONFIG_PATH.is_file():
            raise FileNotFoundError(
                f"{TINY_CONFIG_PATH} is missing: the p4q-tiny config ships as package data; "
                "reinstall p4q_lightning (pip install -e .) so model/configs/*.json is included"
            )
        open_clip.add_model_config(TINY_CONFIG_PATH)
    return TINY_MODEL_NAME
