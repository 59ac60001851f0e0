"""onnxruntime on the exported integer graph vs onnxruntime on the float graph, and vs our int8
torch path: speed, file size and agreement.

    python benchmarks/bench_onnx.py [--model ViT-B-32] [--preset w8a8] [--batch 32] [--reps 7]

Builds a P4Q classifier of ``--model`` (random weights: same compute as pretrained), quantizes
and calibrates it on random images with min-max ranges, and writes (1) the ONNX graph
``export_onnx`` makes (images -> class logits: image tower, adapter, normalisation, class matrix,
logit scale), (2) the float32 graph of the same model (same builder, quantizers off, the float
teacher's weights) and (3) the low-bit safetensors file that ``load_lowbit(path, int8=True)``
runs with int8 torch kernels. Times one batch of each, interleaved, median of ``--reps``, with
``--threads`` threads everywhere; prints the optimized graph's op types (what onnxruntime made
of the Q/DQ pattern), file sizes and the agreement of the ONNX logits with the fake-quant
student's. Quote ratios from one run (``cpu-exclusive``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from p4q_lightning import P4QClassifier
from p4q_lightning.args import PromptArgs
from p4q_lightning.export import load_lowbit
from p4q_lightning.export.from_module import export_module
from p4q_lightning.export.onnx import export_onnx
from p4q_lightning.export.onnx.writer import float_image_model, save_model
from p4q_lightning.quant import ALL_GROUPS


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency random images (more image-like than white noise), normalized."""
    low = torch.randn(n, 3, max(size // 16, 2), max(size // 16, 2), generator=generator)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return img + 0.1 * torch.randn(n, 3, size, size, generator=generator)


def session(
    path: Path,
    threads: int,
    optimized: Path | None = None,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_types(path: Path) -> str:
    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=None, help="keep the files here (default: temp)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    clf = P4QClassifier.build(
        args.model,
        None,
        method="p4q",
        quant=args.preset,
        quant_overrides={grp: {"a_observer": "minmax"} for grp in ALL_GROUPS},
        prompt=PromptArgs(n_ctx=4),
    )
    clf.set_classes([f"class {i}" for i in range(args.classes)])
    size = clf.student.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    clf.calibrate(list(smooth_images(64, size, g).split(16)), progress=False)
    clf.eval()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    out.mkdir(parents=True, exist_ok=True)
    q_path, f_path, lowbit = (
        out / "model.onnx",
        out / "model-float.onnx",
        out / "model-lowbit.safetensors",
    )
    report = export_onnx(clf, q_path)
    with torch.no_grad():
        text = clf.student_text_features().float()
    save_model(float_image_model(clf.teacher, clf.adapter, text, clf.logit_scale), f_path)
    export_module(clf, lowbit)
    int8 = load_lowbit(lowbit, int8=True)

    images = smooth_images(args.eval_images, size, g)
    q_sess = session(q_path, args.threads, out / "model.optimized.onnx")
    f_sess = session(f_path, args.threads)
    # the same graph without onnxruntime's fusions: Q/DQ evaluated in float, no integer kernel
    plain = session(q_path, args.threads, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    compared = {
        "onnxruntime, integer graph": lambda c: q_sess.run(["logits"], {"images": c.numpy()})[0],
        "same graph, fusions off (float Q/DQ)": lambda c: plain.run(
            ["logits"], {"images": c.numpy()}
        )[0],
        "torch int8 (load_lowbit int8=True)": lambda c: int8.logits(c).numpy(),
        # for scale: how far the student itself moves when its input moves by float rounding
        "fake-quant student, input + 1e-6 noise": lambda c: clf.student_logits(
            c + 1e-6 * torch.randn(c.shape, generator=g)
        ).numpy(),
    }
    agree = dict.fromkeys(compared, 0)
    cos: dict[str, list[float]] = {k: [] for k in compared}
    with torch.no_grad():
        for chunk in images.split(args.batch):
            ref = clf.student_logits(chunk)
            for name, fn in compared.items():
                got = torch.from_numpy(fn(chunk))
                agree[name] += int(ref.argmax(1).eq(got.argmax(1)).sum())
                cos[name].append(float(F.cosine_similarity(ref, got, dim=-1).min()))

    x = images[: args.batch]
    xn = x.numpy()
    runs = {
        "onnxruntime, integer graph": lambda: q_sess.run(["logits"], {"images": xn}),
        "onnxruntime, float graph": lambda: f_sess.run(["logits"], {"images": xn}),
        "torch int8 (load_lowbit int8=True)": lambda: int8.logits(x),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            with torch.inference_mode():
                fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    q_ms = med["onnxruntime, integer graph"]
    sizes = {
        "integer graph": q_path.stat().st_size,
        "float graph": f_path.stat().st_size,
        "low-bit safetensors": lowbit.stat().st_size,
    }

    w = sys.stdout.write
    w(
        f"\n{args.model} (random weights), preset {args.preset}, P4Q classifier ({args.classes} "
        f"classes, adapter), batch {args.batch}, {args.threads} threads, onnxruntime "
        f"{ort.__version__}, opset 21\n\n"
    )
    w("| path | ms / batch | images / s | integer graph is faster by |\n|---|---:|---:|---:|\n")
    for name in runs:
        w(
            f"| {name} | {med[name] * 1e3:.1f} | {args.batch / med[name]:.1f} | "
            f"{med[name] / q_ms:.2f}x |\n"
        )
    w("\n| file | MB | vs float graph |\n|---|---:|---:|\n")
    for name, n in sizes.items():
        w(f"| {name} | {n / 1e6:.2f} | {n / sizes['float graph']:.3f}x |\n")
    w(
        f"\nweights in the integer graph: {report.int8_weights} INT8, {report.int4_weights} INT4, "
        f"{report.float_weights} float\n"
    )
    w(f"\nagreement with the fake-quant student on {len(images)} random images:\n\n")
    w("| path | same top-1 | min logits cosine |\n|---|---:|---:|\n")
    for name in compared:
        w(f"| {name} | {agree[name] / len(images):.2%} | {min(cos[name]):.6f} |\n")
    w(f"onnxruntime's optimized integer graph: {op_types(out / 'model.optimized.onnx')}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
