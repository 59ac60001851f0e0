"""int8 CPU inference vs float32: speed and top-1 agreement with the fake-quant student.

    python benchmarks/bench_int8.py [--model ViT-B-32] [--preset w8a8] [--batch 32] [--reps 5]

Builds ``--model`` (random weights unless ``--pretrained``), quantizes it, calibrates it on
random images, and times ``encode_image`` for: the float32 open_clip model, the fake-quant
student, and the student converted to real int8 GEMMs (:func:`convert_to_int8`). Agreement is
the share of images whose top-1 class (over ``--classes`` prompt features from the student's
text tower) is the same for int8 and fake-quant. Timings are medians of interleaved runs.
Prints the CPU's int8-relevant flags and the kernel chosen (fbgemm needs VNNI to be exact at
8 bits; ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` makes any x86 CPU behave like one without it),
then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from p4q_lightning import calibrate, get_spec, load_clip, quantize
from p4q_lightning.export import convert_to_int8, cpu_int8_report
from p4q_lightning.quant import ALL_GROUPS


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency random images (more image-like than white noise), normalized."""
    low = torch.randn(n, 3, max(size // 16, 2), max(size // 16, 2), generator=generator)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return img + 0.1 * torch.randn(n, 3, size, size, generator=generator)


def timed(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--observer", default="minmax", help="activation observer (omse is slow on CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same random weights every run (agreement depends on the draw)
    model, _, tokenizer = load_clip(args.model, args.pretrained)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    spec = get_spec(args.preset, {grp: {"a_observer": args.observer} for grp in ALL_GROUPS})
    student = quantize(model, spec)
    prompts = [f"a photo of a class {i}." for i in range(args.classes)]
    calibrate(
        student, smooth_images(64, size, g).split(16), tokenizer(prompts).split(50), progress=False
    )
    int8 = convert_to_int8(copy.deepcopy(student))

    with torch.inference_mode():
        text = F.normalize(student.encode_text(tokenizer(prompts)), dim=-1)
        text_fp = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    images = smooth_images(args.eval_images, size, g)
    agree, agree_fp, cos, rel = 0, 0, [], []
    with torch.inference_mode():
        for chunk in images.split(args.batch):
            fq, i8 = student.encode_image(chunk), int8.encode_image(chunk)
            fp = model.encode_image(chunk)
            agree += int(
                (F.normalize(fq, dim=-1) @ text.t())
                .argmax(1)
                .eq((F.normalize(i8, dim=-1) @ text.t()).argmax(1))
                .sum()
            )
            fq_top = (F.normalize(fq, dim=-1) @ text.t()).argmax(1)
            fp_top = (F.normalize(fp, dim=-1) @ text_fp.t()).argmax(1)
            agree_fp += int(fq_top.eq(fp_top).sum())
            cos.append(F.cosine_similarity(fq, i8, dim=-1).min())
            rel.append((fq - i8).norm() / fq.norm())
    x = images[: args.batch]
    runs = {
        "float32": model.encode_image,
        "fake-quant": student.encode_image,
        "int8": int8.encode_image,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        timed(fn, x)  # warm-up
    for _ in range(args.reps):
        for name, fn in runs.items():
            times[name].append(timed(fn, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = sys.stdout
    cpu = cpu_int8_report()
    out.write(
        f"\n{args.model} ({args.pretrained or 'random weights'}), preset {args.preset}, "
        "image encoder, "
        f"batch {args.batch}, {args.threads} threads, int8 backend {cpu['int8_backend']}\n"
        f"CPU: torch capability {cpu['cpu_capability']}, flags "
        f"{' '.join(cpu['cpu_flags']) or 'none of avx2/avx512/vnni'}, fbgemm exact here: "
        f"{cpu['fbgemm_exact']}"
        + (
            f" (FBGEMM_ENABLE_INSTRUCTIONS={cpu['fbgemm_instructions_env']})"
            if cpu["fbgemm_instructions_env"]
            else ""
        )
        + "\n\n"
    )
    out.write("| path | ms / batch | images / s | speedup vs float32 |\n|---|---:|---:|---:|\n")
    for name in runs:
        out.write(
            f"| {name} | {med[name] * 1e3:.1f} | {args.batch / med[name]:.1f} | "
            f"{med['float32'] / med[name]:.2f}x |\n"
        )
    out.write(
        f"\ntop-1 agreement int8 vs fake-quant over {args.classes} classes: "
        f"{agree / len(images):.2%} ({agree}/{len(images)} images); min feature cosine "
        f"{float(min(cos)):.6f}; relative feature error {float(max(rel)):.2e}\n"
    )
    out.write(
        f"for scale: top-1 agreement fake-quant vs float32 (its own text tower): "
        f"{agree_fp / len(images):.2%}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
