"""Class-sharded text under DDP: per-rank text time at ``devices=2`` vs ``devices=1`` (CPU, gloo).

    python benchmarks/bench_text_ddp.py [--model ViT-B-32] [--classes 100] [--reps 5]

Each rank (one thread each) builds the same w4a4 P4Q module (random-weight towers, calibrated on
random images) and times what a training step does with the text tower: the class-sharded
student text features (:meth:`student_text_features` with ``sharded=True``: 1/W of the
classes per rank, gathered with gradient), a loss, the backward pass, and the all-reduce of the
prompt gradient that DDP performs. Prints the median per-rank time (min-max over reps and
ranks) for each world size and the ratio. With 2 CPU cores, 2 ranks of 1 thread use the whole
machine; compare ratios within one run, since timings vary with load.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_prompt_step import build_p4q, classnames


def run_rank(rank: int, world_size: int, args: argparse.Namespace, init: str, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    names = classnames(args.classes)
    size = 224
    module = build_p4q(args, names, size)
    ctx = module.classifier.prompt_learner.ctx
    times, shards = [], []
    for rep in range(args.reps + 1):
        dist.barrier()
        start = time.perf_counter()
        text = module.classifier.student_text_features(sharded=True)
        (text @ text.t()).logsumexp(-1).mean().backward()
        dist.all_reduce(ctx.grad)  # what DDP does with the prompt gradient
        ctx.grad = None
        if rep:
            times.append(time.perf_counter() - start)
        shards.append(module.classifier.text_shard)
    torch.save({"times": times, "shard": shards[-1]}, f"{out}.{rank}")
    dist.destroy_process_group()


def measure(world_size: int, args: argparse.Namespace) -> tuple[list[float], list]:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        out = os.path.join(tmp, "times")
        mp.spawn(run_rank, args=(world_size, args, init, out), nprocs=world_size, join=True)
        results = [torch.load(f"{out}.{r}") for r in range(world_size)]
    return [t for r in results for t in r["times"]], [r["shard"] for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    rows = {}
    for world_size in (1, 2):
        rows[world_size] = measure(world_size, args)
    print(
        f"\n{args.model}, w4a4, {args.classes} classes, n_ctx {args.n_ctx}, text pass forward + "
        "backward + prompt-gradient all-reduce per rank (1 thread per rank, gloo)\n"
    )
    print("| devices | classes per rank | median s / step | min-max |\n|---|---|---:|---:|")
    for world_size, (times, shards) in rows.items():
        print(
            f"| {world_size} | {', '.join(f'{hi - lo}' for lo, hi in shards)} | "
            f"{statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} |"
        )
    ratio = statistics.median(rows[2][0]) / statistics.median(rows[1][0])
    print(f"\nper-rank text time, devices=2 / devices=1: {ratio:.2f}x")


if __name__ == "__main__":
    main()
