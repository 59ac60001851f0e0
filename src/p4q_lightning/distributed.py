"""The few torch.distributed collectives the package uses, each a no-op without a process group.

Tensors travel on ``device`` (NCCL needs CUDA tensors; gloo takes CPU ones) and come back where
they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank() -> int:
    """This process's rank: the process group's, else the one Lightning read from the launch
    environment (set before the group exists, e.g. in ``prepare_data``), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def all_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(tensor: torch.Tensor, src: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (others pass a tensor of the same shape)."""
    if world()[1] == 1:
        return tensor
    t = tensor.to(device, copy=True).contiguous()  # never written into the caller's tensor
    dist.broadcast(t, src=src)
    return t.to(tensor.device)


def broadcast_in_place(
    tensors: Iterable[torch.Tensor], src: int = 0, device: torch.device | str = "cpu"
) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values: one broadcast per dtype
    (every rank passes tensors of the same shapes and dtypes, in the same order)."""
    if world()[1] == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        if dtype == torch.bool:  # carried as bytes: not every backend reduces bools
            flat = broadcast(flat.to(torch.uint8), src, device).bool()
        else:
            flat = broadcast(flat, src, device)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n
