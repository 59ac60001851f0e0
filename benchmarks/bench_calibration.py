"""Calibration time of ViT-B/32 on the official calibration set, and distance from float.

    python benchmarks/bench_calibration.py [--images 1280] [--batch 128] [--presets ...]

The official P4Q calibration is 10 batches x 128 training images plus every class x template
prompt (here 100 classes x 4 templates, 400 prompts). Weights and images are random
(pretrained=None, N(0, 1) pixels): the time does not depend on their values. For each preset
the script times :func:`p4q_lightning.calibrate` (images and texts together), then measures
the relative L2 distance of the calibrated student's features from the float model's on 128
held-out images and 100 prompts. A float forward pass over the same data is timed too, so the
table separates the encoder passes from the range search. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from p4q_lightning import calibrate, load_clip, quantize

TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "art of a {}.")


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=1280, help="calibration images")
    p.add_argument("--batch", type=int, default=128, help="calibration batch size")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--presets", nargs="+", default=["p4q-official", "p4q-448"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip: no pretrained weights loaded
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, tokenizer = load_clip(args.model, None)
    model.eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(0)
    n_batches = -(-args.images // args.batch)
    images = [
        torch.randn(min(args.batch, args.images - i * args.batch), 3, size, size, generator=g)
        for i in range(n_batches)
    ]
    prompts = [t.format(f"class {c}") for c in range(args.classes) for t in TEMPLATES]
    texts = [tokenizer(prompts[i : i + 256]) for i in range(0, len(prompts), 256)]
    held_images = torch.randn(128, 3, size, size, generator=g)
    held_texts = tokenizer([f"a photo of a class {c}." for c in range(100)])

    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        for batch in images:
            model.encode_image(batch)
        for batch in texts:
            model.encode_text(batch)
        float_seconds, float_cpu = time.perf_counter() - start, time.process_time() - cpu
        ref_image = model.encode_image(held_images)
        ref_text = model.encode_text(held_texts)

    out = sys.stdout
    out.write(
        f"Calibration of {args.model} (random weights) on {args.images} images in batches of "
        f"{args.batch} + {len(prompts)} prompts, {args.threads} threads; a float forward pass "
        f"over the same data takes {float_seconds:.1f} s ({float_cpu:.1f} s of CPU time). "
        "CPU time (all threads) depends less on other load than wall time.\n\n"
    )
    out.write(
        "| preset | calibration, wall (s) | calibration, CPU (s) | image features vs float "
        "| text features vs float |\n"
    )
    out.write("|---|---:|---:|---:|---:|\n")
    out.flush()
    for preset in args.presets:  # one row at a time: a full run takes many minutes on a CPU
        student = quantize(model, preset)
        start, cpu = time.perf_counter(), time.process_time()
        calibrate(student, images=images, texts=texts, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        with torch.no_grad():
            image_err = rel_l2(student.encode_image(held_images), ref_image)
            text_err = rel_l2(student.encode_text(held_texts), ref_text)
        out.write(
            f"| {preset} | {seconds:.1f} | {cpu_seconds:.1f} | {100 * image_err:.2f} % "
            f"| {100 * text_err:.2f} % |\n"
        )
        out.flush()
        del student
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
