"""The embedded CPU demo's own parts: the synthetic-world teacher and its pretraining.

``p4q_lightning.demo.teacher`` pretrains ``p4q-tiny`` (an ordinary open_clip CLIP, registered
by :func:`p4q_lightning.model.clip.register_tiny_clip`) on the synthetic world and caches it;
``pretrained="synthetic:<seed>"`` loads it. Nothing here imports Lightning.
"""
