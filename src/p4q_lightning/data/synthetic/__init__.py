"""The synthetic world: procedural labelled images, captions, and the downstream class set."""

from p4q_lightning.data.synthetic.captions import CaptionConfig, CaptionWriter
from p4q_lightning.data.synthetic.task import TEMPLATES, ClassSet, generate_split
from p4q_lightning.data.synthetic.world import WorldConfig, render, sample_scenes

__all__ = [
    "TEMPLATES",
    "CaptionConfig",
    "CaptionWriter",
    "ClassSet",
    "WorldConfig",
    "generate_split",
    "render",
    "sample_scenes",
]
