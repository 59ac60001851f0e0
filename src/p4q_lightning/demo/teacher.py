"""The demo teacher: ``p4q-tiny`` (a small open_clip CLIP) pretrained on the synthetic world.

The model is an ordinary open_clip ``CLIP`` (a ``VisionTransformer`` and a text transformer
with ``nn.MultiheadAttention``, OpenAI tokenizer), i.e. the same code path as ViT-B/32, only
narrow and shallow. ``ensure_teacher_checkpoint`` pretrains it contrastively on generated
image-caption pairs once per world seed and caches the weights, so zero-shot classification
with "a photo of a {class}." works offline. This module does not import Lightning.

Recipe (about 2.5 minutes with 2 CPU threads): 1,200 steps of 64 pairs, batches built from
groups of look-alikes; for the first 600 steps the text tower stays at its random init and
captions are terse and complete (so the image tower learns shape and texture against fixed
targets), then both towers train on the varied captions. World seed 0 reaches 62 % held-out
zero-shot top-1 on the 48 texture-colour-shape classes (chance 2.1 %): colour, shape and size
are learned well, texture only partly, which leaves room for few-shot prompt tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from p4q_lightning.data.cache import cache_dir as resolve_cache_dir
from p4q_lightning.data.synthetic.captions import CaptionConfig, CaptionWriter
from p4q_lightning.data.synthetic.task import TEMPLATES, ClassSet, generate_split, stream_generator
from p4q_lightning.data.synthetic.world import Scenes, WorldConfig, render, sample_scenes
from p4q_lightning.demo.schedule import LinearWarmupCosine
from p4q_lightning.files import atomic_write
from p4q_lightning.model.text_encoder import TextTower, template_text_features
from p4q_lightning.model.tiny import TINY_CONFIG_PATH as CONFIG_PATH
from p4q_lightning.model.tiny import TINY_MODEL_NAME as MODEL_NAME
from p4q_lightning.model.tiny import register_tiny_clip

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAME",
    "PretrainConfig",
    "encode_captions",
    "ensure_teacher_checkpoint",
    "pretrain_tiny_clip",
    "recipe_fingerprint",
    "register_tiny_clip",
    "sample_grouped_scenes",
    "zero_shot_report",
]
# Bump when the world, captions or training loop change in a way the config does not capture.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class PretrainConfig:
    """The teacher's pretraining recipe; every field is part of the checkpoint's cache key."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50  # linear LR warm-up, then cosine decay
    weight_decay: float = 0.05
    group_size: int = 8  # hard negatives: batch members come in groups sharing attributes
    # Warm-up: the text tower stays at its random init and captions are terse and complete, so
    # the image tower first learns every attribute against fixed targets (a ViT learns shape
    # far too slowly when both towers start from noise); then both towers train on captions.
    warmup_text_frozen_steps: int = 600
    init_logit_scale: float = 100.0  # a sharp softmax from the start amplifies weak differences
    world: WorldConfig = field(default_factory=WorldConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    eval_per_class: int = 50  # held-out test images per class for the zero-shot report
    # torch threads while pretraining (None keeps the caller's count). Fixed by default: float
    # reductions split differently per thread count, so the cached teacher would otherwise
    # depend on who pretrained it first (the test suite runs with one thread, `make demo` not).
    threads: int | None = 2


def recipe_fingerprint(world_seed: int, config: PretrainConfig) -> str:
    """A short hash of everything that determines the checkpoint (config, recipe, seed)."""
    payload = {
        "model": json.loads(CONFIG_PATH.read_text()),
        "pretrain": dataclasses.asdict(dataclasses.replace(config, threads=None)),
        "recipe": RECIPE_VERSION,
        "world_seed": int(world_seed),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def ensure_teacher_checkpoint(
    world_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    config: PretrainConfig | None = None,
) -> Path:
    """Return the cached ``p4q-tiny`` checkpoint for ``world_seed``, pretraining it once if absent.

    The file is a safetensors state dict loadable with
    ``open_clip.create_model("p4q-tiny", pretrained=str(path))``; a JSON report with the
    held-out zero-shot accuracy sits beside it. Concurrent callers (DDP ranks) wait on a file
    lock instead of training twice.
    """
    from safetensors.torch import save_file

    config = config or PretrainConfig()
    root = resolve_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{MODEL_NAME}-world{world_seed}-{recipe_fingerprint(world_seed, config)}"
    path = root / f"{stem}.safetensors"
    if path.is_file():
        return _readable(path)
    with _announced_lock(str(root / f"{stem}.lock"), world_seed):
        if path.is_file():  # another process finished while we waited
            return _readable(path)
        log.info(
            "pretraining the %s teacher for world seed %d (%d steps, cached at %s)",
            MODEL_NAME,
            world_seed,
            config.steps,
            path,
        )
        start = time.perf_counter()
        progress = root / f"{stem}.progress.pt"
        model = pretrain_tiny_clip(world_seed, config, progress_path=progress)
        seconds = time.perf_counter() - start
        report = {
            "world_seed": world_seed,
            "pretrain_seconds": round(seconds, 1),
            "steps": config.steps,
            "batch_size": config.batch_size,
            "fingerprint": recipe_fingerprint(world_seed, config),
        }
        report.update(zero_shot_report(model, world_seed, config.world, config.eval_per_class))
        log.info(
            "p4q-tiny pretrained in %.0f s; held-out zero-shot top-1 %.1f %% on %d classes",
            seconds,
            100 * report["zero_shot_top1"],
            report["num_classes"],
        )
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_write(path) as tmp:
            save_file(state, str(tmp), metadata={k: str(v) for k, v in report.items()})
        with atomic_write(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        progress.unlink(missing_ok=True)
    return path


def _readable(path: Path) -> Path:
    """``path`` when its safetensors header covers the file; a truncated or damaged cache is
    refused naming the file and the fix (instead of safetensors' "incomplete metadata")."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # SafetensorError and OSError, depending on the damage
        raise ValueError(
            f"the cached demo teacher {path} is damaged or truncated ({err}); delete it "
            "(and the .json beside it) and the teacher is pretrained again on the next run"
        ) from err
    return path


@contextlib.contextmanager
def _announced_lock(lock_path: str, world_seed: int) -> Iterator[None]:
    """Hold the teacher's file lock; say so (once) when another process holds it first."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(
            "waiting for another process to finish pretraining the %s teacher for world seed %d "
            "(lock %s; a few minutes on CPU)",
            MODEL_NAME,
            world_seed,
            lock_path,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float, normalised with OpenAI CLIP's mean and std."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def encode_captions(model: torch.nn.Module, tokens: torch.Tensor, buckets: int = 2) -> torch.Tensor:
    """Text features of token ids, with gradients, over length-sorted groups.

    Each group is cut to its longest caption (exact under the causal mask), so short captions
    skip the padding; the encoding is the package's :class:`TextTower`.
    """
    tower = TextTower(model)
    order = tokens.argmax(dim=-1).argsort()
    proj = model.text_projection
    out = torch.empty(len(tokens), proj.shape[1], dtype=proj.dtype)
    for chunk in order.chunk(buckets):
        ids = tokens[chunk]
        eot = tower.eot_index(ids)
        ids = ids[:, : int(eot.max()) + 1]
        out[chunk] = tower.encode_embeddings(tower.token_embedding(ids), eot)
    return out


def schedule(cfg: PretrainConfig) -> LinearWarmupCosine:
    """A linear ramp over ``cfg.warmup_steps``, then cosine decay over the rest of the steps."""
    return LinearWarmupCosine(warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)


def _save_progress(
    path: Path, step: int, model: torch.nn.Module, opt: list, gen: torch.Generator, writer: Any
) -> None:
    """Everything the next step depends on, so an interrupted pretraining resumes exactly."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in opt],
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "writer_rng": writer.rng.getstate(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_progress(
    path: Path, model: torch.nn.Module, opt: list, gen: torch.Generator, writer: Any
) -> int:
    """Restore :func:`_save_progress`'s state; return the number of steps already done."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        for o, o_state in zip(opt, state["optimizers"], strict=True):
            o.load_state_dict(o_state)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        writer.rng.setstate(_as_tuple(state["writer_rng"]))
    except Exception as err:  # a damaged progress file costs a restart, not the run
        log.warning("ignoring unreadable pretraining progress %s (%s); starting over", path, err)
        return 0
    log.info("resuming p4q-tiny pretraining from step %d (%s)", state["step"], path)
    return int(state["step"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def pretrain_tiny_clip(
    world_seed: int,
    config: PretrainConfig | None = None,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    progress_path: str | os.PathLike[str] | None = None,
    save_every: int | None = None,
) -> torch.nn.Module:
    """Contrastively pretrain a fresh ``p4q-tiny`` on generated pairs; deterministic per seed.

    With ``progress_path`` the state is saved every ``save_every`` steps (default: a tenth of
    the run) and a later call resumes from it, ending with exactly the uninterrupted weights.
    """
    cfg = config or PretrainConfig()
    name = register_tiny_clip()
    with _torch_threads(cfg.threads):
        torch.manual_seed(world_seed)
        model = open_clip.create_model(name, pretrained=None)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
        tokenizer = open_clip.get_tokenizer(name)
        model.train()
        opt = _make_optimizers(model, cfg)
        gen = stream_generator(world_seed, "pretrain")
        writer = CaptionWriter(cfg.world, cfg.captions, seed=world_seed)
        targets = torch.arange(cfg.batch_size)
        lr_schedule = schedule(cfg)
        every = max(1, cfg.steps // 10)
        save_every = save_every or every
        first = 0
        if progress_path is not None and Path(progress_path).is_file():
            first = _load_progress(Path(progress_path), model, opt, gen, writer)
        for step in range(first, cfg.steps):
            scenes = sample_grouped_scenes(cfg.batch_size, cfg.world, gen, cfg.group_size)
            images = normalize_images(render(scenes, cfg.world, gen))
            frozen = step < cfg.warmup_text_frozen_steps
            tokens = tokenizer(writer.canonical(scenes) if frozen else writer(scenes))
            for o in opt:
                for group in o.param_groups:
                    group["lr"] = lr_schedule.lr(cfg.lr, step)
            img = F.normalize(model.encode_image(images), dim=-1)
            with torch.set_grad_enabled(not frozen):
                txt = F.normalize(encode_captions(model, tokens), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            for o in opt:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opt:
                o.step()
            if (step + 1) % every == 0 or step == 0:
                log.info(
                    "p4q-tiny pretraining step %d/%d loss %.3f", step + 1, cfg.steps, loss.item()
                )
            if progress_path is not None and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
                _save_progress(Path(progress_path), step + 1, model, opt, gen, writer)
            if callback is not None:
                callback(step + 1, model)
    model.token_embedding.sparse = False
    model.eval()
    return model


def sample_grouped_scenes(
    n: int, world: WorldConfig, gen: torch.Generator, group_size: int
) -> Scenes:
    """A batch of scenes in groups of look-alikes that differ in one attribute.

    Random batches are mostly separable by colour alone, which a tiny ViT learns first and
    then stalls on. Within a group everything but one attribute (shape, texture or size,
    in turn) is shared, so the contrastive loss pays directly for the harder attributes.
    """
    if group_size <= 1:
        return sample_scenes(n, world, gen)
    groups = -(-n // group_size)
    total = groups * group_size

    def shared(k: int) -> torch.Tensor:
        return torch.randint(k, (groups,), generator=gen).repeat_interleave(group_size)

    free = {
        "shape": torch.randint(len(world.shapes), (total,), generator=gen),
        "texture": torch.randint(len(world.textures), (total,), generator=gen),
        "size": torch.randint(len(world.sizes), (total,), generator=gen),
    }
    varying = (torch.arange(total) // group_size) % 3  # 0: shape, 1: texture, 2: size differ
    attrs = {}
    for k, (name, vocab) in enumerate(
        (("shape", world.shapes), ("texture", world.textures), ("size", world.sizes))
    ):
        attrs[name] = torch.where(varying == k, free[name], shared(len(vocab)))[:n]
    colour = shared(len(world.colours))[:n]
    return sample_scenes(n, world, gen, colour=colour, **attrs)


def _make_optimizers(model: torch.nn.Module, cfg: PretrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for the towers; SparseAdam for the 49k-row token table, of which the world uses
    ~150 rows, so each step touches only those rows instead of all 6M parameters."""
    model.token_embedding.sparse = True
    table = model.token_embedding.weight
    decay, rest = [], []
    for n, p in model.named_parameters():
        if p is table:
            continue
        (decay if p.ndim >= 2 and "embedding" not in n else rest).append(p)
    dense = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        foreach=True,
    )
    return [dense, torch.optim.SparseAdam([table], lr=cfg.lr, betas=(0.9, 0.98))]


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy of ``classifier`` on uint8 images (micro average)."""
    correct = 0
    for i in range(0, len(images), batch_size):
        batch = normalize_images(images[i : i + batch_size])
        feats = F.normalize(model.encode_image(batch), dim=-1)
        correct += int((feats @ classifier.T).argmax(-1).eq(labels[i : i + batch_size]).sum())
    return correct / max(1, len(images))


def zero_shot_report(
    model: torch.nn.Module, world_seed: int, world: WorldConfig, per_class: int = 50
) -> dict[str, float | int]:
    """Zero-shot top-1 of the teacher on the downstream task's held-out test images."""
    classes = ClassSet(world=world)
    images, labels = generate_split(classes, per_class, world_seed, "test")
    tokenizer = open_clip.get_tokenizer(register_tiny_clip())
    model.eval()
    single = template_text_features(model, tokenizer, classes.classnames, TEMPLATES[:1])
    ensemble = template_text_features(model, tokenizer, classes.classnames, TEMPLATES)
    return {
        "num_classes": len(classes),
        "test_images": len(images),
        "chance_top1": 1.0 / len(classes),
        "zero_shot_top1": zero_shot_accuracy(model, images, labels, single),
        "zero_shot_top1_templates": zero_shot_accuracy(model, images, labels, ensemble),
    }
