"""Post-training calibration: quantize the weights once, then fix activation ranges from data."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from p4q_lightning.quant.convert import quant_modules, quant_spec_of, quantizers
from p4q_lightning.quant.modules import QuantMultiheadAttention
from p4q_lightning.quant.quantizer import ActivationQuantizer, WeightQuantizer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Images per calibration batch unless told otherwise: the official P4Q calibration batch (it
#: calibrates on 10 batches of 128 and scores its OMSE search on the last one).
CALIB_BATCH_SIZE = 128


def _batches(data: Iterable[Any] | torch.Tensor | None) -> Iterable[torch.Tensor]:
    """Accept a tensor, an iterable of tensors, or of (tensor, label) pairs (a DataLoader)."""
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        return [data]
    return (b[0] if isinstance(b, (tuple, list)) else b for b in data)


def fixed_batches(batches: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The images of ``batches`` (tensors of any batch sizes) re-cut into batches of ``size``.

    The cut depends only on the number of images: batches of ``size`` from the first image on,
    except that the last batch is always the last ``size`` images (a shorter remainder batch
    comes just before it). So the observers see the same batches however a loader, a DDP run
    or a training batch size cut the same images, and ``a_score_on: last_batch`` scores the last
    ``size`` images, as the official code scores its last batch of 128. Holds at most
    ``2 * size`` images (plus one incoming batch).
    """
    if size < 1:
        raise ValueError(f"calibration batch size {size}: use a positive number of images")
    pending: list[torch.Tensor] = []
    held = 0
    for batch in batches:
        if batch.shape[0] == 0:
            continue
        pending.append(batch)
        held += int(batch.shape[0])
        if held >= 2 * size:
            joined = torch.cat(pending)
            while joined.shape[0] >= 2 * size:  # at least `size` images follow: not the last
                yield joined[:size]
                joined = joined[size:]
            pending, held = [joined], int(joined.shape[0])
    if not pending:
        return
    rest = torch.cat(pending)
    if rest.shape[0] > size:
        yield rest[: rest.shape[0] - size]
        rest = rest[rest.shape[0] - size :]
    yield rest


def image_batches(
    images: Iterable[Any] | torch.Tensor | None, batch_size: int | None = CALIB_BATCH_SIZE
) -> Iterable[torch.Tensor]:
    """The image tensors of ``images`` (see :func:`calibrate`), re-cut by :func:`fixed_batches`
    into batches of ``batch_size`` (None: as given)."""
    batches = _batches(images)
    return batches if batch_size is None else fixed_batches(batches, batch_size)


def _tower_of(name: str) -> str:
    return "vision" if name.startswith("visual.") else "text"


def marking_last_batch(
    batches: Iterable[T], observing: Sequence[ActivationQuantizer]
) -> Iterator[T]:
    """Yield ``batches``; just before the last one, tell ``observing`` it is the last.

    Quantizers that score their range search on the last batch (``a_score_on: last_batch``)
    search while that batch passes, so no batch has to be kept. One batch of lookahead.
    """
    it = iter(batches)
    try:
        pending = next(it)
    except StopIteration:
        return
    for batch in it:
        yield pending
        pending = batch
    for q in observing:
        q.score_next_batch()
    yield pending


@contextlib.contextmanager
def float_weights(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with its (not yet frozen) weights in float, as the official calibration does.

    Weight quantizers are switched off for the duration; frozen weights (already on their
    grid) cannot be turned back into float, so this refuses a calibrated student.
    """
    frozen = [n for n, m in quant_modules(model) if bool(m.weights_frozen)]
    if frozen:
        raise ValueError(
            f"float-weight calibration needs float weights, but {len(frozen)} layer(s) "
            f"(e.g. {frozen[0]}) are already quantized; quantize the float model again "
            "(p4q_lightning.quantize) and calibrate the fresh copy"
        )
    switched = [
        (q, q.bits)
        for _, q in quantizers(model)
        if isinstance(q, WeightQuantizer) and not q.dynamic
    ]
    for q, _ in switched:
        q.bits = None
    try:
        yield
    finally:
        for q, bits in switched:
            q.bits = bits


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: Iterable[Any] | torch.Tensor | None = None,
    texts: Iterable[Any] | torch.Tensor | None = None,
    progress: bool = True,
    batch_size: int | None = CALIB_BATCH_SIZE,
) -> dict[str, dict[str, float]]:
    """Calibrate a student from :func:`quantize` in place and return per-quantizer statistics.

    Weights are quantized first (once, stored on the grid), then image batches run through
    ``encode_image`` and token batches through ``encode_text`` while every activation
    quantizer records its observer's statistics; the chosen ranges become buffers. With the
    spec's ``float_weight_calibration`` the activations are observed behind float weights
    and the weights are quantized afterwards. ``images`` and ``texts`` may be tensors,
    iterables of tensors or DataLoaders of (x, y) pairs.

    The images are re-cut into batches of ``batch_size`` (:func:`fixed_batches`: the last
    batch is the last ``batch_size`` images), so the result does not depend on how ``images``
    is batched; ``batch_size=None`` runs the batches as given. Token batches run as given.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    observe_float = quant_spec_of(model).float_weight_calibration
    if not observe_float:
        for _, module in quant_modules(model):
            module.freeze_weights()

    act = [(n, q) for n, q in quantizers(model) if isinstance(q, ActivationQuantizer)]
    towers_needing_data = {_tower_of(n) for n, _ in act}
    was_training = model.training
    model.eval()
    for _, q in act:
        q.start_observing()
    seen = {"vision": 0, "text": 0}
    try:
        with float_weights(model) if observe_float else contextlib.nullcontext():
            for tower, data, encode in (
                ("vision", images, model.encode_image),
                ("text", texts, model.encode_text),
            ):
                if tower not in towers_needing_data:
                    continue
                observing = [q for n, q in act if _tower_of(n) == tower]
                batches = image_batches(data, batch_size) if tower == "vision" else _batches(data)
                for batch in tqdm(
                    marking_last_batch(batches, observing),
                    desc=f"calibrating {tower}",
                    disable=not progress,
                    leave=False,
                ):
                    encode(batch.to(device))
                    seen[tower] += int(batch.shape[0])
        missing = [t for t in ("vision", "text") if t in towers_needing_data and seen[t] == 0]
        if missing:
            arg = {"vision": "images", "text": "texts"}
            raise ValueError(
                "calibrating with no data: "
                + " and ".join(
                    f"the {t} tower has quantized activations but `{arg[t]}=` is empty"
                    for t in missing
                )
                + "; pass a few batches (e.g. 1,024 training images and the class prompts)"
            )
    except BaseException:
        for _, q in act:
            q.abort_observing()
        raise
    finally:
        model.train(was_training)
    if observe_float:
        for _, module in quant_modules(model):
            module.freeze_weights()

    stats: dict[str, dict[str, float]] = {}
    unseen = []
    for name, q in act:
        if not q.finish_observing():
            unseen.append(name)
        stats[name] = dict(q.last_stats)
    if unseen:
        log.warning(
            "%d activation quantizer(s) saw no data during calibration and stay uncalibrated "
            "(encoding through them raises NotCalibratedError): %s",
            len(unseen),
            ", ".join(unseen[:5]) + (" ..." if len(unseen) > 5 else ""),
        )
    log.info(
        "calibrated %d activation quantizers on %d images and %d texts in %.1f s",
        len(act),
        seen["vision"],
        seen["text"],
        time.perf_counter() - start,
    )
    return stats


def group_statistics(
    stats: dict[str, dict[str, float]], model: nn.Module
) -> dict[str, dict[str, float]]:
    """Average per-quantizer statistics by layer group (e.g. ``vision.mlp_fc``)."""
    group_of = _quantizer_groups(model)
    by_group: dict[str, list[dict[str, float]]] = {}
    for name, s in stats.items():
        owner = name.rsplit(".", 1)[0]
        by_group.setdefault(group_of.get(owner, owner), []).append(s)
    return {
        g: {k: sum(s.get(k, 0.0) for s in ss) / len(ss) for k in ("scale", "clip_ratio")}
        for g, ss in by_group.items()
    }


def _quantizer_groups(model: nn.Module) -> dict[str, str]:
    """Layer group of every module name that owns quantizers.

    Attention's own quantizers (q, k, v, probabilities) form ``{tower}.attn_internals``; the
    tower is read off its ``in_proj`` group, so this holds while that leaf is any layer.
    """
    group_of = {}
    for name, module in quant_modules(model):
        for child_name, _ in module.named_modules():
            group_of[f"{name}.{child_name}" if child_name else name] = module.group
    for name, module in model.named_modules():
        if isinstance(module, QuantMultiheadAttention):
            qkv = group_of.get(f"{name}.in_proj", "")
            group_of[name] = qkv.replace("attn_qkv", "attn_internals") or name
    return group_of
