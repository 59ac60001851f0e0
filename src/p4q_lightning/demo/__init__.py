"""The embedded CPU demo's own parts: the synthetic-world teacher, its pretraining and schedule.

``p4q_lightning.demo.teacher`` pretrains ``p4q-tiny`` (an ordinary open_clip CLIP, registered
by :func:`p4q_lightning.model.tiny.register_tiny_clip`) on the synthetic world and caches it.
Importing this package (the package root does) registers ``pretrained="synthetic[:seed]"`` with
:mod:`p4q_lightning.pretrained_tags`, so ``load_clip`` finds the teacher without the model layer
importing the demo. Nothing here imports Lightning; the teacher is imported on first use.
"""

from __future__ import annotations

from p4q_lightning.pretrained_tags import register_pretrained_resolver
from p4q_lightning.synthetic_name import synthetic_world_seed


def resolve_synthetic_tag(tag: str) -> str | None:
    """The cached teacher checkpoint for ``synthetic[:seed]`` (pretrained once if absent)."""
    seed = synthetic_world_seed(tag)
    if seed is None:
        return None
    from p4q_lightning.demo.teacher import ensure_teacher_checkpoint

    return str(ensure_teacher_checkpoint(world_seed=seed))


register_pretrained_resolver("synthetic", resolve_synthetic_tag)
