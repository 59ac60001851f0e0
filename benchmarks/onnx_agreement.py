"""The exported ONNX graph vs our fake-quant student on the demo world's test split.

    python benchmarks/onnx_agreement.py [--presets w8a8 w4a4] [--epochs N] [--out DIR]

For each preset: trains the demo's P4Q run (``lightning fit --config experiments/demo_cpu.yaml
--model.quant PRESET``, with checkpointing on; skipped when ``OUT/PRESET`` already holds its
checkpoint), exports its checkpoint with ``p4q export CKPT --format onnx --with-text`` (the
command users run), then classifies the 2,400 test images of synthetic world 0 with the
fake-quant student (the checkpoint rebuilt in torch) and with onnxruntime on the graph.
Prints, per preset, the share of images whose top-1 class is the same, the min and mean
cosine of the logits, both accuracies, and the file sizes. Goal: >= 99.5 % and >= 0.999.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F

from p4q_lightning.commands.export import check_checkpoint, module_from_checkpoint
from p4q_lightning.data import FewShotDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "demo_cpu.yaml"


def run(args: list[str]) -> None:
    sys.stderr.write("$ " + " ".join(args) + "\n")
    subprocess.run(args, check=True)


def train(preset: str, run_dir: Path, epochs: int | None) -> Path:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    extra = ["--trainer.max_epochs", str(epochs)] if epochs else []
    run(
        [
            sys.executable,
            "-m",
            "p4q_lightning",
            "fit",
            "--config",
            str(CONFIG),
            "--model.quant",
            preset,
            "--trainer.enable_checkpointing",
            "true",
            "--trainer.logger",
            "false",
            "--run_dir",
            str(run_dir),
            "--overwrite",
            "true",
            *extra,
        ]
    )
    return ckpt


@torch.no_grad()
def compare(ckpt: Path, graph: Path) -> dict[str, float]:
    contents = check_checkpoint(ckpt)
    classifier = module_from_checkpoint(contents).classifier.eval()
    data = FewShotDataModule(
        **{
            k: v
            for k, v in contents["datamodule_hyper_parameters"].items()
            if not k.startswith("_")
        }
    )
    data.setup("test")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    same = correct_torch = correct_onnx = total = 0
    cosines = []
    for images, labels in data.test_dataloader():
        want = classifier.student_logits(images).float()
        got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        same += int(want.argmax(1).eq(got.argmax(1)).sum())
        correct_torch += int(want.argmax(1).eq(labels).sum())
        correct_onnx += int(got.argmax(1).eq(labels).sum())
        cosines.append(F.cosine_similarity(want, got, dim=-1))
        total += len(labels)
    cos = torch.cat(cosines)
    return {
        "images": total,
        "same_top1": same / total,
        "min_cos": float(cos.min()),
        "mean_cos": float(cos.mean()),
        "top1_torch": correct_torch / total,
        "top1_onnx": correct_onnx / total,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["w8a8", "w4a4"])
    p.add_argument("--epochs", type=int, default=None, help="default: the demo config's")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "onnx-agreement")
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets:
        run_dir = args.out / preset
        ckpt = train(preset, run_dir, args.epochs)
        graph = run_dir / "model.onnx"
        run(
            [
                sys.executable,
                "-m",
                "p4q_lightning",
                "export",
                str(ckpt),
                "--format",
                "onnx",
                "--with-text",
                "--out",
                str(graph),
            ]
        )
        rows.append(
            (
                preset,
                compare(ckpt, graph),
                graph.stat().st_size,
                (run_dir / "model-text.onnx").stat().st_size,
            )
        )
    w = sys.stdout.write
    w(
        "\nONNX graph (onnxruntime) vs fake-quant student, synthetic world 0 test split, "
        f"onnxruntime {ort.__version__}\n\n"
    )
    w(
        "| preset | images | same top-1 | min logits cosine | mean logits cosine | top-1 torch | "
        "top-1 onnx | graph (MB) | text graph (MB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for preset, r, size, text_size in rows:
        w(
            f"| {preset} | {r['images']} | {r['same_top1']:.2%} | {r['min_cos']:.6f} | "
            f"{r['mean_cos']:.6f} | {r['top1_torch']:.2%} | {r['top1_onnx']:.2%} | "
            f"{size / 1e6:.2f} | {text_size / 1e6:.2f} |\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
