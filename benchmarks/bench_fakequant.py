"""Eval throughput of a calibrated fake-quant ViT-B-32 image tower relative to float open_clip.

Everything is measured in one run: the float tower and the calibrated ``w8a8`` and ``w4a4``
students are timed interleaved (the order rotates every repeat) on the same batch under
``torch.inference_mode`` after a warm-up, and each ratio is a median over repeats, so machine
drift hits all models alike. The goal is a ratio of at least 0.8 (fake quantization costs at
most 25 % more time). Prints a markdown table of ratios that the README quotes.

    python benchmarks/bench_fakequant.py                 # CPU, threads = available cores
    python benchmarks/bench_fakequant.py --device cuda   # one GPU
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from p4q_lightning import calibrate, load_clip, quantize

GOAL = 0.8


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], torch.Tensor], device: torch.device, iters: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed rounds; the median is reported"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="forwards per timing (default 1 CPU, 10 GPU)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: available cores")
    parser.add_argument("--presets", nargs="+", default=["w8a8", "w4a4"])
    args = parser.parse_args()

    logging.disable(logging.WARNING)  # open_clip warns that pretrained=None loads no weights
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    threads = args.threads or _available_cores()
    torch.set_num_threads(threads)
    batch = args.batch or (128 if device.type == "cuda" else 16)
    iters = args.iters or (10 if device.type == "cuda" else 1)

    torch.manual_seed(0)
    model, _, tokenizer = load_clip(args.model, pretrained=None)
    model = model.to(device).eval()
    calib_images = [torch.randn(8, 3, 224, 224, device=device) for _ in range(2)]
    calib_texts = [
        tokenizer([f"a photo of a {w}." for w in ("dog", "cat", "car", "tree")]).to(device)
    ]
    towers: dict[str, torch.nn.Module] = {"float": model.visual}
    for preset in args.presets:
        student = quantize(model, preset)
        calibrate(student, images=calib_images, texts=calib_texts, progress=False)
        towers[preset] = student.visual.eval()

    x = torch.randn(batch, 3, 224, 224, device=device)
    times: dict[str, list[float]] = {name: [] for name in towers}
    with torch.inference_mode():
        reference = towers["float"](x)
        cosine = {n: F.cosine_similarity(t(x), reference).mean().item() for n, t in towers.items()}
        for _ in range(args.warmup):
            for tower in towers.values():
                tower(x)
        names = list(towers)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(_time_once(lambda t=towers[name]: t(x), device, iters))

    base = statistics.median(times["float"])
    print(
        f"fake-quant eval throughput, {args.model} image tower, relative to float open_clip "
        f"(device {device.type}, {threads} threads, batch {batch}, median of {args.repeats}):\n"
    )
    print("| model | throughput vs float | mean cosine to float | goal >= 0.8x |")
    print("|---|---|---|---|")
    for name in names:
        ratio = base / statistics.median(times[name])
        ok = "-" if name == "float" else ("yes" if ratio >= GOAL else "no")
        print(f"| {name} | {ratio:.2f}x | {cosine[name]:.4f} | {ok} |")


if __name__ == "__main__":
    main()
