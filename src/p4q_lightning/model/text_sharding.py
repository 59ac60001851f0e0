"""Class-sharded text features under data parallelism.

Every rank needs the text features of every class for its logits, but encoding all classes on
every rank repeats the same work W times. Instead rank ``r`` encodes one contiguous slice of the
classes and the slices are all-gathered with gradient (``torch.distributed.nn.functional``):
the backward pass sums each slice's gradient over the ranks' losses and hands it to the rank
that encoded it, so after DDP averages parameter gradients the prompt receives exactly the
gradient of the unsharded computation, at 1/W of the text-tower cost per rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from p4q_lightning.distributed import world


def shard_bounds(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n_items`` that ``rank`` encodes (ceil-sized)."""
    per = math.ceil(n_items / world_size)
    lo = min(rank * per, n_items)
    return lo, min(lo + per, n_items)


def gather_sharded(
    n_items: int, encode: Callable[[int, int], torch.Tensor]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``encode(lo, hi)`` of this rank's slice, all-gathered into all ``n_items`` rows.

    Returns the full [n_items, ...] tensor and the slice this rank encoded. Without a process
    group, or with fewer items than ranks (a rank would own nothing, and DDP needs every rank
    to produce prompt gradients), every rank encodes everything.
    """
    rank, world_size = world()
    if world_size == 1 or n_items < world_size:
        return encode(0, n_items), (0, n_items)
    lo, hi = shard_bounds(n_items, rank, world_size)
    local = encode(lo, hi)
    per = math.ceil(n_items / world_size)
    if local.shape[0] < per:  # all_gather needs equal shapes: pad the last slice
        pad = local.new_zeros((per - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    gathered = all_gather(local.contiguous()) if torch.is_grad_enabled() else _gather(local)
    return torch.cat(gathered)[:n_items], (lo, hi)


def _gather(local: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return parts
