"""Activation memory of the prompt text-tower step for many classes, with and without chunking
and activation checkpointing.

    python benchmarks/bench_text_memory.py [--model ViT-B-32-quickgelu] [--preset w8a8]
        [--classes 1000] [--chunk 250] [--measure 100]

Counts, device-independently, the bytes autograd keeps for the backward pass
(``saved_tensors_hooks``, unique storages, not counting the frozen weights) while the learned
prompts of every class run through the quantized student's text tower: all classes at once;
with ``--chunk`` classes per checkpointed chunk (only chunk inputs are kept; the backward
recomputes one chunk at a time, so its peak adds one chunk's activations). Kept bytes grow
linearly with the class count, so they are measured on ``--measure`` classes (chunks scaled
alike) and scaled to ``--classes``, which keeps the script runnable on a CPU. Prints a
markdown table.
"""

from __future__ import annotations

import argparse

import open_clip
import torch

from p4q_lightning.model.text_encoder import encode_prompts
from p4q_lightning.module import P4QModule


def saved_bytes(fn, exclude: set[int]) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the unique storages saved for backward, except ``exclude`` (the weights)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--measure", type=int, default=100, help="classes actually run (scaled up)")
    args = p.parse_args()

    names = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    module = P4QModule(args.model, None, quant=args.preset, classnames=names)
    module.classifier.calibrate([torch.randn(2, 3, 224, 224)], progress=False)
    pl = module.classifier.prompt_learner
    weights = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}

    def run(n: int, chunk: int | None, ckpt: bool):  # type: ignore[no-untyped-def]
        # clone: the measured slice must not share storage with all classes' prompts
        return lambda: encode_prompts(
            module.classifier.student, pl()[:n].clone(), pl.eot_index[:n], chunk, ckpt
        )

    n = min(args.measure, args.classes)
    scale = args.classes / n
    chunk = max(1, round(args.chunk / scale))
    full = saved_bytes(run(n, None, False), weights) * scale
    one_chunk = saved_bytes(run(chunk, None, False), weights) * args.chunk / chunk
    inputs = (
        saved_bytes(run(n, chunk, True), weights) * scale
    )  # the chunks' inputs (prompt embeddings)
    mb = 2**20
    print(
        f"| {args.model} {args.preset}, {args.classes} classes, seq len {pl.seq_len} "
        f"(measured on {n}) | kept for backward (MB) |"
    )
    print("|---|---|")
    print(f"| all classes at once | {full / mb:.0f} |")
    print(f"| chunks of {args.chunk} + checkpointing: kept | {inputs / mb:.0f} |")
    peak = (inputs + one_chunk) / mb
    print(
        f"| chunks of {args.chunk} + checkpointing: backward peak (kept + one chunk) | {peak:.0f} |"
    )


if __name__ == "__main__":
    main()
