"""Few-shot data: the CoOp protocol over hub datasets, image folders and the synthetic world.

Imports are lazy so that ``p4q_lightning.data.synthetic`` (used by the tiny teacher) does not
pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FewShotDataModule": "p4q_lightning.data.datamodule",
    "FeatureServing": "p4q_lightning.data.feature_serving",
    "ImageSource": "p4q_lightning.data.sources",
    "FolderSource": "p4q_lightning.data.sources",
    "SyntheticSource": "p4q_lightning.data.sources",
    "CorruptImageError": "p4q_lightning.data.sources",
    "HubSource": "p4q_lightning.data.hub",
    "make_split": "p4q_lightning.data.fewshot",
    "sample_per_class": "p4q_lightning.data.fewshot",
    "cache_dir": "p4q_lightning.data.cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p4q_lightning.data' has no attribute {name!r}")


__all__ = list(_LAZY)
