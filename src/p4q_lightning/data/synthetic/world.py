"""A procedural world of small labelled RGB images with compositional attributes.

Every image shows one main object described by four attributes (colour, shape, texture, size)
on a muted, gradient background with pixel noise, sometimes with a small distractor object
behind it. Attribute words are shared across classes ("red" appears in many class names), so
a CLIP pretrained on captions of this world can classify unseen combinations zero-shot.
Object centres sit on an 8-pixel grid (the teacher's patch size), which is what lets a tiny
ViT learn shapes within a CPU budget. Rendering is vectorised over a batch and fully
determined by a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F

# Reference RGB of each colour word; objects get a jittered version of it.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.16, 0.68, 0.20),
    "blue": (0.14, 0.30, 0.92),
    "yellow": (0.95, 0.88, 0.14),
    "purple": (0.56, 0.20, 0.76),
    "orange": (0.98, 0.55, 0.08),
    "pink": (0.98, 0.56, 0.76),
    "cyan": (0.10, 0.84, 0.88),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
# Object radius as a fraction of the image side, per size word.
SIZE_RADIUS = {"small": (0.18, 0.24), "large": (0.30, 0.40)}


@dataclass(frozen=True)
class WorldConfig:
    """Vocabulary and nuisance ranges of the world (part of the teacher's cache key)."""

    image_size: int = 32
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    textures: tuple[str, ...] = TEXTURES
    sizes: tuple[str, ...] = SIZES
    distractor_prob: float = 0.25
    max_noise: float = 0.05
    colour_jitter: float = 0.07
    max_rotation: float = 0.0  # radians; a small angle keeps squares and diamonds apart
    # Object centres snap to this pixel grid (0: anywhere). Aligned with the 8-pixel ViT patches,
    # a tiny ViT learns shapes in a few hundred steps instead of thousands.
    position_grid: int = 8

    def __post_init__(self) -> None:
        for name, known in (
            ("colours", PALETTE),
            ("shapes", SHAPES),
            ("textures", TEXTURES),
            ("sizes", SIZES),
        ):
            unknown = [w for w in getattr(self, name) if w not in known]
            if unknown:
                raise ValueError(
                    f"WorldConfig.{name}: unknown words {unknown}; known: {list(known)}"
                )
        if self.image_size < 16:
            raise ValueError(f"WorldConfig.image_size={self.image_size}: use at least 16 pixels")


@dataclass
class Scenes:
    """Sampled attributes of a batch of images; indices refer to the ``WorldConfig`` tuples."""

    colour: torch.Tensor
    shape: torch.Tensor
    texture: torch.Tensor
    size: torch.Tensor
    radius: torch.Tensor  # pixels
    cx: torch.Tensor
    cy: torch.Tensor
    angle: torch.Tensor
    bg: torch.Tensor  # [N, 3] base background colour
    bg_grad: torch.Tensor  # [N, 2] gradient per pixel along x and y
    has_distractor: torch.Tensor
    d_colour: torch.Tensor
    d_shape: torch.Tensor
    d_radius: torch.Tensor
    d_cx: torch.Tensor
    d_cy: torch.Tensor
    noise: torch.Tensor  # per-image noise std

    def __len__(self) -> int:
        return int(self.colour.shape[0])

    def select(self, index: torch.Tensor | slice) -> Scenes:
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_scenes(
    n: int,
    cfg: WorldConfig,
    generator: torch.Generator,
    colour: torch.Tensor | None = None,
    shape: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
) -> Scenes:
    """Sample ``n`` scenes; attributes passed as index tensors are kept, the rest drawn."""
    g = generator

    def pick(given: torch.Tensor | None, k: int) -> torch.Tensor:
        return given.long().clone() if given is not None else torch.randint(k, (n,), generator=g)

    colour, shape = pick(colour, len(cfg.colours)), pick(shape, len(cfg.shapes))
    texture, size = pick(texture, len(cfg.textures)), pick(size, len(cfg.sizes))
    s = float(cfg.image_size)
    lo = torch.tensor([SIZE_RADIUS[w][0] for w in cfg.sizes])[size]
    hi = torch.tensor([SIZE_RADIUS[w][1] for w in cfg.sizes])[size]
    radius = (lo + (hi - lo) * torch.rand(n, generator=g)) * s
    margin = radius * 0.9
    cx = margin + (s - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (s - 2 * margin) * torch.rand(n, generator=g)
    if cfg.position_grid > 0:
        # The nearest grid point that keeps the object inside (the middle if none does).
        step = float(cfg.position_grid)
        lo = torch.ceil(margin / step) * step
        hi = torch.floor((s - margin) / step) * step
        middle = torch.full_like(cx, s / 2)
        cx, cy = (
            torch.where(lo <= hi, (torch.round(c / step) * step).clamp(lo, hi), middle)
            for c in (cx, cy)
        )
    angle = _uniform(n, -cfg.max_rotation, cfg.max_rotation, g)
    grey = _uniform(n, 0.2, 0.75, g)[:, None]
    tint = (torch.rand(n, 3, generator=g) - 0.5) * _uniform(n, 0.0, 0.4, g)[:, None]
    bg = (grey + tint).clamp(0.05, 0.95)
    bg_grad = (torch.rand(n, 2, generator=g) - 0.5) * (0.5 / s)
    has_distractor = torch.rand(n, generator=g) < cfg.distractor_prob
    # A distractor never shares the main object's colour, so captions stay unambiguous.
    d_colour = (colour + torch.randint(1, len(cfg.colours), (n,), generator=g)) % len(cfg.colours)
    d_shape = torch.randint(len(cfg.shapes), (n,), generator=g)
    d_radius = _uniform(n, 0.09, 0.14, g) * s
    d_cx = d_radius + (s - 2 * d_radius) * torch.rand(n, generator=g)
    d_cy = d_radius + (s - 2 * d_radius) * torch.rand(n, generator=g)
    noise = _uniform(n, 0.0, cfg.max_noise, g)
    return Scenes(
        colour,
        shape,
        texture,
        size,
        radius,
        cx,
        cy,
        angle,
        bg,
        bg_grad,
        has_distractor,
        d_colour,
        d_shape,
        d_radius,
        d_cx,
        d_cy,
        noise,
    )


def _shape_mask(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of one shape in object units (radius 1, y pointing down)."""
    au, av = u.abs(), v.abs()
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return torch.maximum(au, av) <= 0.8
    if name == "triangle":  # apex up
        return (v <= 0.75) & (au <= (v + 1.0) * 0.62)
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if name == "cross":
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if name == "diamond":
        return au + av <= 1.05
    raise ValueError(f"unknown shape {name!r}")


def _texture(
    name: str, xs: torch.Tensor, ys: torch.Tensor, theta: torch.Tensor, period: float
) -> torch.Tensor:
    """Boolean mask of the darker pattern pixels of one texture (phase already in xs, ys)."""
    if name == "striped":
        along = xs * torch.cos(theta) + ys * torch.sin(theta)
        return torch.frac(along / period + 100.0) < 0.5
    if name == "dotted":
        du = torch.frac(xs / period + 100.0) - 0.5
        dv = torch.frac(ys / period + 100.0) - 0.5
        return du * du + dv * dv <= 0.09
    if name == "checkered":
        return (torch.floor(xs / period) + torch.floor(ys / period)).remainder(2) == 0
    if name == "plain":
        return torch.zeros_like(xs, dtype=torch.bool)
    raise ValueError(f"unknown texture {name!r}")


def _by_group(index: torch.Tensor, names: tuple[str, ...], fn, *args: torch.Tensor) -> torch.Tensor:
    """Evaluate ``fn(name, *args[rows])`` only on the rows whose ``index`` selects ``name``."""
    out = torch.zeros(args[0].shape, dtype=torch.bool)
    for k, name in enumerate(names):
        rows = (index == k).nonzero().flatten()
        if len(rows):
            out[rows] = fn(name, *(a[rows] for a in args))
    return out


def render(
    scenes: Scenes, cfg: WorldConfig, generator: torch.Generator, supersample: int = 2
) -> torch.Tensor:
    """Draw the scenes as a uint8 tensor [N, 3, H, W] (anti-aliased by supersampling)."""
    n, s, ss = len(scenes), cfg.image_size, supersample
    coords = (torch.arange(s * ss, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(n, -1, -1), y.expand(n, -1, -1)
    col = lambda t: t[:, None, None]  # noqa: E731

    img = (
        scenes.bg[:, :, None, None]
        + (
            scenes.bg_grad[:, 0, None, None] * (x - s / 2)
            + scenes.bg_grad[:, 1, None, None] * (y - s / 2)
        )[:, None]
    )
    palette = torch.tensor([PALETTE[w] for w in cfg.colours])

    # Distractor first, so the main object is drawn over it.
    du = (x - col(scenes.d_cx)) / col(scenes.d_radius)
    dv = (y - col(scenes.d_cy)) / col(scenes.d_radius)
    d_mask = _by_group(scenes.d_shape, cfg.shapes, _shape_mask, du, dv) & col(scenes.has_distractor)
    d_rgb = palette[scenes.d_colour][:, :, None, None]
    img = torch.where(d_mask[:, None], d_rgb.expand_as(img), img)

    dx, dy = x - col(scenes.cx), y - col(scenes.cy)
    cos, sin = col(torch.cos(scenes.angle)), col(torch.sin(scenes.angle))
    u = (cos * dx + sin * dy) / col(scenes.radius)
    v = (-sin * dx + cos * dy) / col(scenes.radius)
    mask = _by_group(scenes.shape, cfg.shapes, _shape_mask, u, v)
    jitter = 1.0 + cfg.colour_jitter * torch.randn(n, 3, generator=generator)
    brightness = _uniform(n, 0.8, 1.1, generator)[:, None]
    rgb = (palette[scenes.colour] * jitter * brightness).clamp(0, 1)
    period = max(3.0, s / 8.0)
    phase = torch.rand(n, 2, generator=generator)[:, :, None, None] * period
    theta = (torch.randint(4, (n,), generator=generator).float() * (math.pi / 4))[:, None, None]
    pattern = _by_group(
        scenes.texture,
        cfg.textures,
        partial(_texture, period=period),
        x + phase[:, 0],
        y + phase[:, 1],
        theta.expand_as(x),
    )
    obj = torch.where(pattern[:, None], (rgb * 0.35)[:, :, None, None], rgb[:, :, None, None])
    img = torch.where(mask[:, None], obj, img)

    if ss > 1:
        img = F.avg_pool2d(img, ss)
    img = img + scenes.noise[:, None, None, None] * torch.randn(img.shape, generator=generator)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)
