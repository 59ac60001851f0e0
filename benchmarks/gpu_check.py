"""The GPU check: everything a short loan of one GPU should measure, in one run, as one JSON.

    python benchmarks/gpu_check.py                       # one CUDA GPU, ViT-B-32 (< 8 min, H100)
    python benchmarks/gpu_check.py --device cpu --tiny   # same paths, tiny, CPU (slow tests)
    python benchmarks/gpu_check.py --out gpu_check.json  # also write the JSON to a file

It prints one JSON object (progress goes to stderr) with:

- ``steps``: the P4Q w4a4 training step inside ``Trainer.fit`` with the feature cache (the
  public path), random ViT-B-32 weights, batch 32, 16 context vectors, at 100 and 1,000
  classes, in ``32-true`` and ``bf16-mixed``; 1,000 classes also with the ImageNet configs'
  ``chunk_size: 250`` + checkpointing. Median step time and peak GPU memory of each
  (``torch.cuda.max_memory_allocated``; on a CPU the process's peak RSS instead), for the
  training steps (the frozen towers released) and for everything before them (build,
  calibration, feature cache).
- ``image_tower``: images/s of the float open_clip image tower, the calibrated w4a4 student
  (fake quantization) and the same student with real int8 GEMMs (``convert_to_int8``,
  ``torch._int_mm`` on CUDA), in inference mode.
- ``int8_matmul``: ``torch._int_mm`` (int8 x int8 -> int32) against the float32 and bfloat16
  matmul on ViT-B-32's linear-layer shapes, with whether the int32 result is exact.
- ``gpu_tests``: pytest's verdict on every test marked ``gpu`` (they skip without CUDA).

Nothing here downloads weights or data (random weights, random images, generated class names).

**A bare GPU machine** usually has a CUDA build of torch and torchvision but may lack the rest
of pyproject.toml's requirements (open_clip_torch, lightning, torchmetrics, wandb, datasets,
jsonargparse, safetensors, matplotlib, timm, ...) and pytest; it may have no internet. Bring
them as wheels. On a machine with internet, the same CPU architecture and the same Python
minor version as the GPU machine, with ``reqs.txt`` holding pyproject.toml's dependencies
minus torch and torchvision, plus ``pytest``::

    pip download -d wheels -r reqs.txt          # add --python-version 3.11
                                                # --platform manylinux2014_x86_64
                                                # --only-binary=:all: for another machine
    rm -f wheels/torch-* wheels/nvidia_* wheels/triton-*   # keep the GPU machine's CUDA torch

Copy ``wheels/`` and this repository over; on the GPU machine, from the repository root::

    pip install --no-index --find-links wheels -r reqs.txt
    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("gpu_check")

#: full run: ViT-B-32 at the issue's sizes; tiny: the packaged p4q-tiny model, a few classes
FULL = {
    "model": "ViT-B-32",
    "classes": (100, 1000),
    "batch": 32,
    "n_ctx": 16,
    "chunk": 250,
    "steps": 5,
    "warmup": 2,
    "image_batch": 128,
    "image_reps": 10,
    "tokens": 50,
}
TINY = {
    "model": "p4q-tiny",
    "classes": (4, 12),
    "batch": 4,
    "n_ctx": 4,
    "chunk": 5,
    "steps": 2,
    "warmup": 1,
    "image_batch": 8,
    "image_reps": 2,
    "tokens": 17,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the process's peak RSS (VmHWM) starts afresh (Linux >= 4.0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the peak stays the process's


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mb()


def _names(n: int) -> list[str]:
    from bench_prompt_step import classnames

    return classnames(n)


def _image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _step(cfg: dict[str, Any], device: torch.device, n: int, precision: str, chunked: bool):
    """Median step time (s) and peak memory (MB) of P4Q w4a4 in ``Trainer.fit`` (cache on)."""
    from bench_prompt_step import MINMAX, RandomImages, StepTimer, step_trainer

    from p4q_lightning.args import FeatureArgs, PromptArgs
    from p4q_lightning.module import P4QModule

    prompt = PromptArgs(n_ctx=cfg["n_ctx"])
    if chunked:
        prompt = PromptArgs(n_ctx=cfg["n_ctx"], chunk_size=cfg["chunk"], checkpointing=True)
    module = P4QModule(
        cfg["model"],
        None,
        quant="w4a4",
        quant_overrides=MINMAX,
        prompt=prompt,
        features=FeatureArgs(views=1),
        classnames=_names(n),
        templates=["a photo of a {}."],
    )
    size = _image_size(module.classifier.teacher)
    gen = torch.Generator().manual_seed(0)
    module.to(device)
    module.classifier.calibrate(
        [torch.randn(8, 3, size, size, generator=gen).to(device)], progress=False
    )
    images = torch.randn(2 * cfg["batch"], 3, size, size, generator=gen)

    class SyncedTimer(StepTimer):
        peak_before = peak_steps = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            _sync(device)
            if not self.times and not self.peak_before:  # first step: cache filled, towers out
                self.peak_before = _peak_mb(device)
                _reset_peak(device)
            super().on_train_batch_start(*args)

        def on_train_end(self, *args: Any) -> None:  # before the module reads the towers back
            self.peak_steps = _peak_mb(device)

        def on_train_batch_end(self, *args: Any) -> None:
            _sync(device)
            super().on_train_batch_end(*args)

    timer = SyncedTimer()
    trainer = step_trainer(cfg["warmup"] + cfg["steps"], [timer], device.type, precision)
    _reset_peak(device)
    trainer.fit(module, datamodule=RandomImages(_names(n), images, cfg["batch"]))
    times = timer.times[cfg["warmup"] :]
    result = {
        "classes": n,
        "precision": precision,
        "chunk_size": cfg["chunk"] if chunked else None,
        "checkpointing": chunked,
        "step_s": round(statistics.median(times), 5),
        "step_s_min": round(min(times), 5),
        "step_s_max": round(max(times), 5),
        "peak_mb_steps": round(timer.peak_steps, 1),
        "peak_mb_before_steps": round(timer.peak_before, 1),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    del trainer, module
    return result


def _timed(fn: Any, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _image_tower(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Images/s of the float tower, the fake-quant w4a4 student and its int8 conversion."""
    import copy

    from bench_prompt_step import MINMAX

    from p4q_lightning import calibrate, get_spec, load_clip, quantize
    from p4q_lightning.export import convert_to_int8

    torch.manual_seed(0)
    model, _, tokenizer = load_clip(cfg["model"], None)
    model = model.to(device).eval()
    size = _image_size(model)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(16, 3, size, size, generator=gen).to(device)
    result: dict[str, Any] = {"batch": cfg["image_batch"]}
    students = {}
    for preset in ("w4a4", "w8a8"):
        student = quantize(model, get_spec(preset, {**MINMAX, "adapter": {}}))
        texts = tokenizer([f"a photo of a {name}." for name in _names(8)]).to(device)
        calibrate(student, images=[calib], texts=[texts], progress=False)
        students[preset] = student
    x = torch.randn(cfg["image_batch"], 3, size, size, generator=gen).to(device)
    runs = {"float32": model, **{f"fake-quant {k}": v for k, v in students.items()}}
    int8 = convert_to_int8(copy.deepcopy(students["w8a8"]).cpu(), backend="int_mm").to(device)
    runs["int8 w8a8 (torch._int_mm)"] = int8
    with torch.inference_mode():
        seconds = {
            k: _timed(lambda m=m: m.encode_image(x), device, cfg["image_reps"])
            for k, m in runs.items()
        }
        fq = students["w8a8"].encode_image(x).float()
        i8 = int8.encode_image(x).float()
    base = seconds["float32"]
    result["images_per_s"] = {k: round(cfg["image_batch"] / s, 1) for k, s in seconds.items()}
    result["vs_float32"] = {k: round(base / s, 3) for k, s in seconds.items()}
    result["int8_vs_fake_quant_min_cosine"] = round(
        float(torch.nn.functional.cosine_similarity(fq, i8, dim=-1).min()), 6
    )
    return result


def _int8_matmul(cfg: dict[str, Any], device: torch.device, reps: int) -> list[dict[str, Any]]:
    """``torch._int_mm`` vs float32 and bfloat16 matmuls on ViT-B-32's linear shapes."""
    m = cfg["image_batch"] * cfg["tokens"]
    m = max(32, (m + 7) // 8 * 8)  # _int_mm wants M > 16 and multiples of 8
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    gen = torch.Generator().manual_seed(2)
    rows = []
    for k, n in shapes:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8).to(device)
        b_t = b.t().contiguous().t()  # column-major operand, as cuBLASLt int8 prefers
        af, bf = a.float(), b.float()
        ab, bb = a.bfloat16(), b.bfloat16()
        with torch.inference_mode():
            t_int = _timed(partial(torch._int_mm, a, b_t), device, reps)
            t_f32 = _timed(partial(torch.matmul, af, bf), device, reps)
            t_bf16 = _timed(partial(torch.matmul, ab, bb), device, reps)
            rows_checked = torch._int_mm(a, b_t)[:64].cpu().long()  # int64 reference on the CPU
            exact = rows_checked.equal(a[:64].cpu().long() @ b.cpu().long())
        rows.append(
            {
                "shape_mkn": [m, k, n],
                "int_mm_ms": round(t_int * 1e3, 4),
                "float32_ms": round(t_f32 * 1e3, 4),
                "bfloat16_ms": round(t_bf16 * 1e3, 4),
                "int_mm_vs_float32": round(t_f32 / t_int, 3),
                "int_mm_vs_bfloat16": round(t_bf16 / t_int, 3),
                "int32_exact": bool(exact),
            }
        )
    return rows


def _gpu_tests(timeout: int) -> dict[str, Any]:
    """pytest on every test marked ``gpu`` (only the files that hold one are collected)."""
    files = sorted(
        str(p) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    if not files:
        return {"files": [], "returncode": None, "summary": "no test is marked gpu"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    return {
        "files": [str(Path(f).relative_to(ROOT)) for f in files],
        "returncode": out.returncode,
        "passed": out.returncode == 0,
        "summary": lines[-1] if lines else out.stderr[-500:],
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="p4q-tiny and a few classes (CPU check)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 with --device cpu)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "root", "open_clip"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda but torch sees no CUDA GPU; use --device cpu --tiny for the CPU check"
        )
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)  # a second thread mostly waits on shared CPUs
    cfg = TINY if args.tiny else FULL
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": cfg["model"],
        "tiny": args.tiny,
        "threads": torch.get_num_threads(),
        "steps": [],
    }
    precisions = ["32-true", "bf16-mixed"]
    for n in cfg["classes"]:
        for precision in precisions:
            for chunked in (False, True) if n == max(cfg["classes"]) else (False,):
                log.info("step: %d classes, %s, chunked=%s", n, precision, chunked)
                report["steps"].append(_step(cfg, device, n, precision, chunked))
    log.info("image tower throughput")
    report["image_tower"] = _image_tower(cfg, device)
    log.info("int8 matmul")
    report["int8_matmul"] = _int8_matmul(cfg, device, cfg["image_reps"])
    if not args.skip_tests:
        log.info("gpu-marked tests")
        report["gpu_tests"] = _gpu_tests(timeout=300)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    ok = report.get("gpu_tests", {}).get("passed", True) is not False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
