"""CLIP loading, prompt learner, adapter and prompt-through-text-tower encoding."""

from p4q_lightning.model.clip import load_clip

__all__ = ["load_clip"]
