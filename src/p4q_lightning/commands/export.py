"""``p4q export CKPT [--out FILE] [--format lowbit|onnx]``: write a P4Q/PTQ checkpoint as a low-bit
safetensors file, or as an ONNX graph from images to class logits (``--with-text``: also the
text tower with the learned context). ``--format onnx`` also takes a low-bit file as CKPT."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_output(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "-lowbit.safetensors")


def check_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (tensors and plain values only); a file that is not a Lightning
    checkpoint of a P4QModule is refused in one line."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds on a file that is not its format
        reason = (
            "not a torch checkpoint file"
            if isinstance(err, (KeyError, IndexError, EOFError, pickle.UnpicklingError))
            else " ".join(str(err).split())[:160] or type(err).__name__
        )
        raise ValueError(
            f"{path} is not a readable Lightning checkpoint ({reason}); pass the .ckpt file a "
            "fit wrote, e.g. runs/.../checkpoints/last.ckpt"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(
            f"{path} is a torch file but not a Lightning checkpoint of a P4QModule (no "
            "state_dict/hyper_parameters); pass the .ckpt file a fit wrote"
        )
    from p4q_lightning.training.checkpointing import check_finite

    check_finite(ckpt["state_dict"], str(path))  # before the model is rebuilt
    return ckpt


def refuse_unexportable(ckpt: dict) -> None:
    """A checkpoint of a method the low-bit file cannot hold is refused in one line, naming why
    (Tip-Adapter's cache, CLIP-LoRA's float factors)."""
    from p4q_lightning.export.format import ExportMismatchError
    from p4q_lightning.methods import METHODS

    method = ckpt["hyper_parameters"].get("method")
    refusal = METHODS[method].export_refusal if method in METHODS else None
    if refusal is not None:
        raise ExportMismatchError(
            f"method={method!r} does not export to the low-bit file: {refusal}"
        )


def module_from_checkpoint(ckpt: dict) -> Any:
    """The P4QModule a checkpoint describes, with its prompt, adapter and ranges loaded.

    Hyperparameters of earlier versions (flat ``n_ctx``, ``prompt_lr``...) are put into their
    groups; keys Lightning adds (``_instantiator``...) are not arguments."""
    from p4q_lightning.legacy import group_flat_hparams
    from p4q_lightning.module import P4QModule

    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    module = P4QModule(**group_flat_hparams(hparams))
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p4q export",
        description="Export the calibrated low-bit student, learned prompt and adapter of a P4Q "
        "(or PTQ) checkpoint as integer weights + JSON metadata (loads with "
        "p4q_lightning.load_lowbit), or as an ONNX graph from images to class logits "
        "(--format onnx; needs pip install 'p4q_lightning[onnx]').",
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="Lightning checkpoint (.ckpt) of a P4QModule; with --format onnx also a low-bit "
        ".safetensors file",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file (default: CKPT-lowbit.safetensors, or CKPT.onnx with --format onnx)",
    )
    parser.add_argument(
        "--format",
        choices=("lowbit", "onnx"),
        default="lowbit",
        help="lowbit: packed integer safetensors (default); onnx: an onnxruntime graph",
    )
    parser.add_argument(
        "--with-text",
        action="store_true",
        help="(onnx) also write OUT-text.onnx: token ids of new class names -> class embeddings "
        "through the student text tower with the learned context",
    )
    parser.add_argument("--verify", action="store_true", help="reload the file and check it")
    args = parser.parse_args(argv)
    if args.with_text and args.format != "onnx":
        parser.error("--with-text writes a second ONNX graph: use it with --format onnx")
    if args.format == "onnx":
        from p4q_lightning.export.onnx import require_onnx

        require_onnx()  # one line naming the install command, before any slow work
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    if args.format == "onnx":
        return export_onnx_file(args.checkpoint, args.out, args.with_text, args.verify)

    from p4q_lightning.export import load_lowbit
    from p4q_lightning.export.format import check_writable
    from p4q_lightning.export.from_module import export_module

    out = (args.out or default_output(args.checkpoint)).expanduser()
    check_writable(out)  # before the minutes a large model takes to rebuild
    ckpt = check_checkpoint(args.checkpoint)
    refuse_unexportable(ckpt)  # before the model is rebuilt
    module = module_from_checkpoint(ckpt)
    module.eval()
    report = export_module(module.classifier, out)
    sys.stdout.write(
        f"wrote {report.path} ({report.file_bytes / 1e6:.2f} MB; float32 state dict "
        f"{report.float32_bytes / 1e6:.2f} MB, {report.ratio:.2f}x smaller)\n"
    )
    if args.verify:
        loaded = load_lowbit(report.path)
        sys.stdout.write(f"verified: {len(loaded.classnames)} classes, spec {loaded.spec.name}\n")
    return 0


def data_preprocessing(ckpt: dict) -> dict[str, Any]:
    """Mean, std and interpolation the run's datamodule used (saved by LightningCLI), if any."""
    hparams = ckpt.get("datamodule_hyper_parameters") or {}
    return {k: hparams[k] for k in ("mean", "std", "interpolation") if hparams.get(k)}


def export_onnx_file(checkpoint: Path, out: Path | None, with_text: bool, verify: bool) -> int:
    """``--format onnx``: the graph of a checkpoint's classifier or of a low-bit file."""
    from p4q_lightning.export.format import check_writable
    from p4q_lightning.export.onnx import export_onnx

    out = (out or checkpoint.with_suffix(".onnx")).expanduser()
    check_writable(out)
    if checkpoint.suffix == ".safetensors":
        from p4q_lightning.export import load_lowbit

        source: Any = load_lowbit(checkpoint)
        preprocessing: dict[str, Any] = {}
    else:
        ckpt = check_checkpoint(checkpoint)
        module = module_from_checkpoint(ckpt)
        module.eval()
        source, preprocessing = module.classifier, data_preprocessing(ckpt)
    report = export_onnx(source, out, with_text=with_text, preprocessing=preprocessing)
    sys.stdout.write(
        f"wrote {report.path} ({report.file_bytes / 1e6:.2f} MB; weights: "
        f"{report.int8_weights} INT8, {report.int4_weights} INT4, {report.float_weights} float)\n"
    )
    for note in report.notes:
        sys.stdout.write(f"note: {note}\n")
    if report.text_path is not None:
        sys.stdout.write(
            f"wrote {report.text_path} ({report.text_bytes / 1e6:.2f} MB; training classes "
            f"reproduced with min cosine {report.text_min_cosine:.6f})\n"
        )
    if verify:
        from p4q_lightning.export.onnx.verify import agreement

        result = agreement(source, report.path)
        sys.stdout.write(
            f"verified: onnxruntime top-1 equals the student's on {result.same_top1}/"
            f"{result.images} random images, min logits cosine {result.min_cosine:.6f}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
