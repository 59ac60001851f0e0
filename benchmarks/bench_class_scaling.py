"""How the P4Q step grows with the number of classes, and the memory it keeps resident.

    python benchmarks/bench_class_scaling.py [--classes 100 300 1000] [--chunked 1000]
        [--model ViT-B-32] [--batch 32] [--steps 3] [--warmup 1]

Each configuration runs in its own process (so each peak RSS is its own): the P4Q w4a4 step
inside ``Trainer.fit`` with the feature cache on (``FeatureArgs(views=1)``), random weights,
16 context vectors, ImageNet class names (``bench_prompt_step.classnames``). ``--chunked N``
adds N classes with the ImageNet configs' ``chunk_size: 250`` and ``checkpointing: true``.

Per configuration it prints the median step, the step per class and the step relative to the
first class count's (linear would be the class ratio), where the text pass's time goes (its
forward and backward, timed after the fit on the same prompts, and the pieces it cuts: padded
prompt positions against the classes' own and against padding every class to the longest),
the frozen weights the fit released, what the kept text tower occupies at the first step (its
quantized weights held as int8 codes and scales) and the RSS at the first step. Peak RSS is
given for the training steps alone (from the first step, the frozen towers released, to the end
of training, before they are read back), for everything before them (build, calibration,
feature cache) and for the whole process (``getrusage``, which includes reading the towers back
after the fit). CPU timings vary with load: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _status_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> None:
    """Start the process's peak RSS (VmHWM) afresh (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def one(n: int, chunked: bool, args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    from bench_prompt_step import MINMAX, RandomImages, StepTimer, classnames, step_trainer
    from lightning.pytorch import Callback

    from p4q_lightning.args import FeatureArgs, PromptArgs
    from p4q_lightning.model.text_encoder import length_pieces
    from p4q_lightning.module import P4QModule

    prompt = PromptArgs(
        n_ctx=args.n_ctx, chunk_size=250 if chunked else None, checkpointing=chunked
    )
    names = classnames(n)
    module = P4QModule(
        args.model,
        None,
        quant="w4a4",
        quant_overrides=MINMAX,
        prompt=prompt,
        features=FeatureArgs(views=1),
        classnames=names,
        templates=["a photo of a {}."],
    )
    size = module.classifier.teacher.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    gen = torch.Generator().manual_seed(0)
    module.classifier.calibrate([torch.randn(8, 3, size, size, generator=gen)], progress=False)
    images = torch.randn(2 * args.batch, 3, size, size, generator=gen)

    class AtStart(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.rss = _rss_mb()  # after the cache is filled and the towers released
                off = pl_module._offload
                self.released = off.nbytes / 2**20 if off is not None and off.released else 0.0
                # what the step's text tower occupies as held (int8 codes + scales, float rest)
                self.kept = off.kept_nbytes() / 2**20 if off is not None else float("nan")
                self.peak_before = _status_mb("VmHWM")  # build, calibration, feature cache
                _reset_peak()

        def on_train_end(self, trainer, pl_module) -> None:  # callbacks run before the module's
            self.peak_steps = _status_mb("VmHWM")  # restore of the released weights

    timer, at_start = StepTimer(), AtStart()
    before_fit = _rss_mb()
    step_trainer(args.warmup + args.steps, [timer, at_start]).fit(
        module, datamodule=RandomImages(names, images, args.batch)
    )
    # getrusage's peak restarted with VmHWM at the first step: the process's is the larger
    peak = max(at_start.peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    steps = timer.times[args.warmup :]
    # where the text pass goes: forward and backward of the same prompts, after the fit
    model = module.classifier.train()
    fwd, bwd = [], []
    for _ in range(2):
        start = time.perf_counter()
        feats = model.student_text_features()
        mid = time.perf_counter()
        feats.sum().backward()
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
    pl = model.prompt_learner
    rest = pl.eot_index - pl.shared_prefix_length
    pieces = length_pieces(rest, 250 if chunked else n)
    return {
        "classes": n,
        "chunked": chunked,
        "step_s": statistics.median(steps),
        "text_fwd_s": min(fwd),
        "text_bwd_s": min(bwd),
        "pieces": len(pieces),
        "padded_positions": sum(c * length for c, length in pieces),
        "own_positions": int((rest + 1).sum()),
        "unsorted_positions": n * int(rest.max() + 1),
        "rss_before_fit_mb": before_fit,
        "rss_first_step_mb": at_start.rss,
        "peak_rss_mb": peak,
        "released_mb": at_start.released,
        "kept_mb": at_start.kept,
        "peak_before_steps_mb": at_start.peak_before,
        "peak_steps_mb": at_start.peak_steps,
    }


def weight_accounting(model_name: str) -> str:
    """What a fit from the cache keeps and releases, counted from the architecture (built on
    the meta device: no memory, no weights): the step's text tower without its token table
    against the teacher, the student's image tower and token table (float32), and the text
    tower as the fit holds it (its linear weights as int8 codes plus a float32 scale per
    output channel, the rest float32)."""
    import open_clip
    from open_clip.model import CLIP

    from p4q_lightning.model.tiny import register_tiny_clip
    from p4q_lightning.training.residency import MIN_NUMEL

    register_tiny_clip()  # the packaged p4q-tiny, for smoke runs of this script
    with torch.device("meta"):
        m = CLIP(**open_clip.get_model_config(model_name))

    def big(params) -> int:  # type: ignore[no-untyped-def]
        return sum(p.numel() for p in params if p.numel() >= MIN_NUMEL)

    kept = big([*m.transformer.parameters(), m.positional_embedding, m.text_projection])
    linear = [p for p in m.transformer.parameters() if p.dim() == 2]  # the quantized weights
    as_codes = sum(p.numel() + 4 * p.shape[0] for p in linear) + 4 * (kept - big(linear))
    released = big(m.parameters()) + big(m.visual.parameters()) + m.token_embedding.weight.numel()
    both = 2 * sum(p.numel() for p in m.parameters())
    gib = 4 / 2**30
    return (
        f"| {model_name} | {both * gib:.2f} | {kept * gib:.2f} | {released * gib:.2f} | "
        f"{as_codes / 2**30:.3f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--chunked", type=int, nargs="*", default=[1000])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-chunked", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one is not None:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        print(json.dumps(one(args.one, args.one_chunked, args)))
        return
    common = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--n-ctx",
        str(args.n_ctx),
        "--threads",
        str(args.threads),
    ]
    configs = [(n, False) for n in args.classes] + [(n, True) for n in args.chunked]
    rows = []
    for n, chunked in configs:
        cmd = [sys.executable, __file__, "--one", str(n), *common]
        out = subprocess.run(
            cmd + (["--one-chunked"] if chunked else []),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            sys.exit(f"{n} classes failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"| {args.model} | P4Q w4a4 in Trainer.fit, feature cache | batch {args.batch} | "
        f"{args.n_ctx} ctx | {args.threads} thread(s) |\n"
    )
    print(
        "| classes | step (s) | per class (ms) | step / first | classes / first | "
        "text fwd / bwd (s) | pieces | padded / own positions (sorted; unsorted) | "
        "released (GB) | text tower as held (MB) | RSS at first step (GB) | peak RSS, steps (GB) | "
        "peak RSS before the steps (GB) | peak RSS, whole process (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"{r['classes']:,}" + (", chunk 250 + ckpt" if r["chunked"] else "")
        print(
            f"| {label} | {r['step_s']:.3f} | {1e3 * r['step_s'] / r['classes']:.2f} | "
            f"{r['step_s'] / base['step_s']:.2f}x | {r['classes'] / base['classes']:.0f}x | "
            f"{r['text_fwd_s']:.2f} / {r['text_bwd_s']:.2f} | {r['pieces']} | "
            f"{r['padded_positions']:,} / {r['own_positions']:,} ({r['unsorted_positions']:,}) "
            f"| {r['released_mb'] / 1024:.2f} | {r['kept_mb']:.1f} | "
            f"{r['rss_first_step_mb'] / 1024:.2f} | "
            f"{r['peak_steps_mb'] / 1024:.2f} | {r['peak_before_steps_mb'] / 1024:.2f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} |"
        )
    print(
        "\n| frozen weights, float32 | teacher + student (GiB) | kept for the cached step "
        "(GiB) | released during the fit (GiB) | kept, as held: int8 codes + scales (GiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys([args.model, "ViT-L-14"]):
        print(weight_accounting(name))
    plain = [r for r in rows if not r["chunked"]]
    for r in rows:
        if r["chunked"]:
            same = next((q for q in plain if q["classes"] == r["classes"]), None)
            if same is not None:
                print(
                    f"\nchunked + checkpointed / unchunked at {r['classes']:,} classes: "
                    f"{r['step_s'] / same['step_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
