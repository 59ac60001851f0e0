"""Captions that describe a synthetic scene in varied words, for contrastive pretraining.

Captions are deliberately imperfect, like web alt-text: colour and shape are almost always
named, size less often, texture only sometimes and then in several phrasings, and many
captions carry distractor words (the background, the position, a second object, filler).
That makes some attributes weakly learned, so the pretrained teacher's zero-shot accuracy on
the full colour-texture-shape class names stays well below 100 %, leaving room for few-shot
prompt tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from p4q_lightning.data.synthetic.world import Scenes, WorldConfig


@dataclass(frozen=True)
class CaptionConfig:
    """How often each attribute is mentioned (part of the teacher's cache key)."""

    p_colour: float = 0.92
    p_size: float = 0.5
    p_texture: float = 0.45
    p_texture_canonical: float = 0.5  # share of texture mentions using the class-name word
    p_background: float = 0.3
    p_position: float = 0.3
    p_distractor: float = 0.6  # mention of a present distractor object
    p_filler: float = 0.35
    p_shuffle_adjectives: float = 0.3


TEXTURE_ADJ = {
    "plain": ("plain", "solid", "flat", "uniform"),
    "striped": ("striped", "stripy", "lined", "banded"),
    "dotted": ("dotted", "spotted", "speckled", "polka dot"),
    "checkered": ("checkered", "chequered", "checked", "tiled"),
}
TEXTURE_WITH = {
    "plain": ("with no pattern", "in a single colour", "without any pattern"),
    "striped": ("with stripes", "with a striped pattern", "covered in lines"),
    "dotted": ("with dots", "with a dotted pattern", "covered in spots"),
    "checkered": ("with a checkerboard pattern", "with checks", "with a grid of squares"),
}
SIZE_ADJ = {
    "small": ("small", "small", "tiny", "little"),
    "large": ("large", "large", "big", "huge"),
}
PREFIXES = (
    "a photo of",
    "an image of",
    "a picture of",
    "a drawing of",
    "a rendering of",
    "a simple synthetic image of",
    "here we can see",
    "this picture shows",
    "look at",
    "a low resolution photo of",
    "a computer generated picture showing",
    "an illustration of",
)
SUFFIXES = (
    "",
    "",
    "in the picture",
    "drawn by a computer",
    "nothing else",
    "on a screen",
    "seen from above",
    "in a tiny image",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position(cx: float, cy: float, size: int, rng: random.Random) -> str:
    third = size / 3
    col = "left" if cx < third else ("right" if cx > 2 * third else "")
    row = "top" if cy < third else ("bottom" if cy > 2 * third else "")
    if not col and not row:
        return rng.choice(("in the middle", "in the centre", "near the centre"))
    if col and row:
        return f"in the {row} {col} corner"
    return f"on the {col}" if col else f"at the {row}"


def _background(bg: tuple[float, float, float], noise: float) -> str:
    level = sum(bg) / 3
    tone = "dark" if level < 0.38 else ("light" if level > 0.6 else "grey")
    if noise > 0.06:
        tone = f"noisy {tone}"
    return f"on a {tone} background"


class CaptionWriter:
    """Writes one caption per scene from a seeded ``random.Random``."""

    def __init__(self, cfg: WorldConfig, caption_cfg: CaptionConfig | None = None, seed: int = 0):
        self.world = cfg
        self.cfg = caption_cfg or CaptionConfig()
        self.rng = random.Random(seed)

    def __call__(self, scenes: Scenes) -> list[str]:
        return [self.caption(scenes, i) for i in range(len(scenes))]

    def canonical(self, scenes: Scenes) -> list[str]:
        """Terse captions naming every attribute ("a large red striped circle."), for warm-up."""
        w = self.world
        out = []
        for i in range(len(scenes)):
            words = (
                w.sizes[int(scenes.size[i])],
                w.colours[int(scenes.colour[i])],
                w.textures[int(scenes.texture[i])],
                w.shapes[int(scenes.shape[i])],
            )
            out.append(f"a {' '.join(words)}.")
        return out

    def caption(self, scenes: Scenes, i: int) -> str:
        r, c, w = self.rng, self.cfg, self.world
        colour = w.colours[int(scenes.colour[i])]
        shape = w.shapes[int(scenes.shape[i])]
        texture = w.textures[int(scenes.texture[i])]
        size = w.sizes[int(scenes.size[i])]

        adjs: list[str] = []
        tail: list[str] = []
        if r.random() < c.p_size:
            adjs.append(r.choice(SIZE_ADJ[size]))
        if r.random() < c.p_colour:
            adjs.append(colour)
        if r.random() < c.p_texture:
            if r.random() < c.p_texture_canonical:
                adjs.append(texture)
            elif r.random() < 0.5:
                adjs.append(r.choice(TEXTURE_ADJ[texture]))
            else:
                tail.append(r.choice(TEXTURE_WITH[texture]))
        if len(adjs) > 1 and r.random() < c.p_shuffle_adjectives:
            r.shuffle(adjs)

        if adjs and r.random() < 0.15:
            # Predicative form: "the circle is red and striped".
            phrase = f"the {shape} is {' and '.join(adjs)}"
        else:
            np_ = " ".join([*adjs, shape])
            phrase = f"{_article(np_)} {np_}"
        if tail:
            phrase = f"{phrase} {tail[0]}"
        if bool(scenes.has_distractor[i]) and r.random() < c.p_distractor:
            d_col = w.colours[int(scenes.d_colour[i])]
            d_shape = w.shapes[int(scenes.d_shape[i])]
            link = r.choice(
                ("and a small", "next to a tiny", "with a little", "in front of a small")
            )
            phrase = f"{phrase} {link} {d_col} {d_shape}"
        extras = []
        if r.random() < c.p_position:
            extras.append(_position(float(scenes.cx[i]), float(scenes.cy[i]), w.image_size, r))
        if r.random() < c.p_background:
            bg = tuple(float(v) for v in scenes.bg[i])
            extras.append(_background(bg, float(scenes.noise[i])))  # type: ignore[arg-type]
        r.shuffle(extras)
        text = " ".join([phrase, *extras])
        if r.random() < c.p_filler:
            text = f"{r.choice(PREFIXES)} {text}"
            suffix = r.choice(SUFFIXES)
            if suffix:
                text = f"{text}, {suffix}"
        return text + "."
