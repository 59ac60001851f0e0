"""The downstream classification task of the synthetic world and its deterministic splits.

Classes are every combination of a texture, a colour and a shape ("striped red circle");
size, position, background, noise and distractors vary freely within a class. The train pool
and the held-out test set come from separate, seeded generator streams, so they never share
an image and are identical on every machine for a given ``world_seed``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from p4q_lightning.data.synthetic.world import WorldConfig, render, sample_scenes

TEMPLATES = (
    "a photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a low resolution photo of a {}.",
)

# Offsets that separate the generator streams of one world seed.
_STREAMS = {"pretrain": 0, "train": 1, "test": 2}


def stream_generator(world_seed: int, stream: str) -> torch.Generator:
    """A torch generator for one named stream (pretrain / train / test) of a world seed."""
    return torch.Generator().manual_seed(int(world_seed) * 1_000_003 + _STREAMS[stream] * 7919 + 17)


@dataclass(frozen=True)
class ClassSet:
    """Which attribute words make up the class names: textures × colours × shapes."""

    textures: tuple[str, ...] = ("plain", "striped", "dotted")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        for name in ("textures", "colours", "shapes"):
            missing = [w for w in getattr(self, name) if w not in getattr(self.world, name)]
            if missing:
                raise ValueError(f"ClassSet.{name}: {missing} are not in the world's {name}")

    def combos(self) -> list[tuple[str, str, str]]:
        return list(itertools.product(self.textures, self.colours, self.shapes))

    @property
    def classnames(self) -> list[str]:
        return [f"{t} {c} {s}" for t, c, s in self.combos()]

    def __len__(self) -> int:
        return len(self.textures) * len(self.colours) * len(self.shapes)

    def world_indices(
        self, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map class labels to (texture, colour, shape) indices of the world vocabulary."""
        combos = self.combos()
        w = self.world
        tex = torch.tensor([w.textures.index(t) for t, _, _ in combos])
        col = torch.tensor([w.colours.index(c) for _, c, _ in combos])
        shp = torch.tensor([w.shapes.index(s) for _, _, s in combos])
        return tex[labels], col[labels], shp[labels]


def generate_split(
    classes: ClassSet, per_class: int, world_seed: int, stream: str, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``per_class`` images of every class: (uint8 [N, 3, H, W], labels [N]), class-major."""
    g = stream_generator(world_seed, stream)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    images = []
    for start in range(0, len(labels), chunk):
        lab = labels[start : start + chunk]
        tex, col, shp = classes.world_indices(lab)
        scenes = sample_scenes(len(lab), classes.world, g, colour=col, shape=shp, texture=tex)
        images.append(render(scenes, classes.world, g))
    return torch.cat(images), labels
