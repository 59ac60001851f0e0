"""Where checkpointing's extra time goes: the text pass forward and backward under several
recomputation strategies, on the shared-prefix path P4Q trains with.

    python benchmarks/bench_text_checkpointing.py [--classes 300] [--chunk 100] [--reps 3]

ViT-B-32 (``--model``; random weights) w4a4, 16 context vectors, ImageNet class names, 1
thread. Each strategy runs the same pieces (``length_pieces``) after the same shared prefix:

- ``unchunked`` / ``chunked``: no checkpointing (all classes in one piece per length / chunks);
- ``per-block MLP``: what ``checkpointing: true`` does now (each block recomputes its MLP's
  widening half, :func:`p4q_lightning.model.shared_prefix.encode_rest`);
- ``chunk, selective``: each chunk checkpointed whole, keeping the outputs of its non-widening
  matmuls (the policy ``checkpointing`` used before, ``text_encoder._narrow_matmul_policy``);
- ``chunk, all matmuls``: the same, keeping every matmul's output;
- ``chunk, whole``: each chunk checkpointed whole with no policy (recomputes everything);
- ``..., int8 codes``: unchunked and per-block MLP with the text tower's quantized weights held
  as int8 codes (``QuantLinear.hold_as_codes``, as a fit from the feature cache holds them).

Prints thread CPU time (steadier than wall time on a shared machine; the run is single
threaded) of the forward and the backward, fastest of ``--reps``, and the ratio to
``unchunked``.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import open_clip
import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prompt_step import MINMAX, classnames  # noqa: E402

from p4q_lightning import calibrate, quantize  # noqa: E402
from p4q_lightning.model import text_encoder as te  # noqa: E402
from p4q_lightning.model.prompt_learner import PromptLearner  # noqa: E402
from p4q_lightning.model.text_encoder import TextTower, length_pieces  # noqa: E402
from p4q_lightning.model.tiny import register_tiny_clip  # noqa: E402
from p4q_lightning.quant import QuantLinear  # noqa: E402


def _all_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # type: ignore[no-untyped-def]
    if op in te._MATMULS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


STRATEGIES = {
    "unchunked": (False, None),
    "chunked": (True, None),
    "per-block MLP": (True, "mlp"),
    "chunk, selective": (
        True,
        lambda: create_selective_checkpoint_contexts(te._narrow_matmul_policy),
    ),
    "chunk, all matmuls": (True, lambda: create_selective_checkpoint_contexts(_all_matmuls)),
    "chunk, whole": (True, "whole"),
    "unchunked, int8 codes": (False, None),
    "per-block MLP, int8 codes": (True, "mlp"),
}


def text_pass(tower: TextTower, pl: PromptLearner, chunk: int | None, how) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Features of every class, the pieces run as ``encode_prompts`` runs them."""
    prompts, eot, shared = pl(), pl.eot_index, pl.shared_prefix_length
    kvs = tower.encode_prefix(prompts[:1, :shared])
    scales = [(s_k, s_v) for _, _, s_k, s_v in kvs]
    extra = tuple(t for k, v, _, _ in kvs for t in (k, v))
    rest, eot = prompts[:, shared:], eot - shared
    pieces = length_pieces(eot, chunk or len(eot))
    order = torch.argsort(eot, stable=True)
    rest, eot = rest.index_select(0, order), eot.index_select(0, order)
    sizes = [n for n, _ in pieces]
    encode = partial(tower.encode_rest, scales, recompute_mlp=how == "mlp")
    out = []
    for x, e, (_, length) in zip(rest.split(sizes), eot.split(sizes), pieces, strict=True):
        x = x[:, :length]
        if how in (None, "mlp"):
            out.append(encode(x, e, *extra))
        elif how == "whole":
            out.append(checkpoint(encode, x, e, *extra, use_reentrant=False))
        else:
            out.append(checkpoint(encode, x, e, *extra, use_reentrant=False, context_fn=how))
    return torch.cat(out).index_select(0, torch.argsort(order))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, default=300)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    register_tiny_clip()  # the packaged p4q-tiny, for smoke runs of this script
    model = open_clip.create_model(args.model, pretrained=None)
    tok = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    names = classnames(args.classes)
    student = quantize(model.eval(), "w4a4", MINMAX)
    texts = tok([f"a photo of a {c}." for c in names[:32]])
    calibrate(student, images=[torch.randn(2, 3, size, size)], texts=[texts], progress=False)
    tower = TextTower(student)
    pl = PromptLearner(names, tok, tower.width, n_ctx=16)
    pl.set_token_embedding(tower.token_embedding)
    layers = [m for m in student.transformer.modules() if isinstance(m, QuantLinear)]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in STRATEGIES}
    for _ in range(args.reps + 1):  # interleaved; the first round warms up
        for name, (chunked, how) in STRATEGIES.items():
            for layer in layers:
                if name.endswith("int8 codes"):
                    layer.hold_as_codes()
                else:
                    layer.restore_float()
            pl.ctx.grad = None
            start = time.thread_time()
            feats = text_pass(tower, pl, args.chunk if chunked else None, how)
            mid = time.thread_time()
            feats.sum().backward()
            times[name].append((mid - start, time.thread_time() - mid))
    print(
        f"| {args.classes} classes, chunks of {args.chunk} | fwd (s) | bwd (s) | total (s) | "
        "/ unchunked |"
    )
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, runs in times.items():
        fwd = min(f for f, _ in runs[1:])
        bwd = min(b for _, b in runs[1:])
        base = base or fwd + bwd
        print(f"| {name} | {fwd:.2f} | {bwd:.2f} | {fwd + bwd:.2f} | {(fwd + bwd) / base:.2f}x |")


if __name__ == "__main__":
    main()
