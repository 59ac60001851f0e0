"""``p4q demo [--seed N]``: the whole P4Q story on the synthetic world, on a laptop CPU.

Runs the packaged ``configs/demo_cpu.yaml`` (the same LightningCLI path as
``lightning fit --config experiments/demo_cpu.yaml``) three times: P4Q at w4a4, P4Q at w8a8 and
CoOp in float. Each run's :class:`~p4q_lightning.callbacks.ComparisonCallback` also scores the
float zero-shot teacher and the PTQ student on the test split, so the three runs give the six
rows of one table. ``--seed`` sets the world, the few-shot split and the training seed together.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p4q_lightning.files import write_csv
from p4q_lightning.rundir import bits_label

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
COLUMNS = ["method", "bits", "shots", "top1", "top5", "size_mb"]
# (method, quant preset): the runs, in order; zero-shot and PTQ rows come from their comparisons
RUNS: tuple[tuple[str, str], ...] = (("p4q", "w4a4"), ("p4q", "w8a8"), ("coop", "fp"))
# the callback's method names -> the demo table's
METHOD_NAMES = {"fp32 zero-shot": "zeroshot", "ptq": "ptq", "p4q": "p4q", "coop": "coop"}
ROW_ORDER = [("zeroshot", "32"), ("coop", "32"), ("ptq", "w4a4"), ("ptq", "w8a8")]
ROW_ORDER += [("p4q", "w4a4"), ("p4q", "w8a8")]


@dataclass
class DemoResult:
    """The table (accuracies in percent) and where it was written."""

    rows: list[dict[str, Any]]
    csv: Path
    figure: Path


def run_args(
    seed: int, method: str, quant: str, out: Path, config: Path, overrides: Sequence[str]
) -> list[str]:
    """LightningCLI arguments of one demo run (``overrides`` last, so they win)."""
    from p4q_lightning.data.cache import cache_dir

    name = f"{method}-{quant}" if method != "coop" else f"coop-{bits_label(None)}"
    return [
        "fit",
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        "--model.pretrained",
        f"synthetic:{seed}",
        "--model.method",
        method,
        "--model.quant",
        quant,
        "--model.features.cache_dir",
        str(cache_dir() / "features"),
        "--data.init_args.dataset",
        f"synthetic:{seed}",
        "--data.init_args.seed",
        str(seed),
        "--run_dir",
        str(out / name),
        "--overwrite",
        "true",  # the demo of one seed always rewrites its own runs
        "--trainer.logger.init_args.name",
        f"demo-seed{seed}-{name}",
        *overrides,
    ]


def _comparison(cli: Any) -> Any:
    from p4q_lightning.callbacks import ComparisonCallback

    for cb in cli.trainer.callbacks:
        if isinstance(cb, ComparisonCallback):
            return cb
    raise RuntimeError("the demo config lost its ComparisonCallback")


def _demo_row(row: dict[str, Any]) -> dict[str, Any]:
    bits = "32" if row["bits"] == bits_label(None) else row["bits"]
    return {
        "method": METHOD_NAMES[row["method"]],
        "bits": bits,
        "shots": int(row["shots"]),
        "top1": round(100 * float(row["top1"]), 2),
        "top5": round(100 * float(row["top5"]), 2),
        "size_mb": round(float(row["size_mb"]), 3),
    }


def run_demo(
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] = DEMO_CONFIG,
    overrides: Sequence[str] = (),
) -> DemoResult:
    """Run the three demo fits and write ``demo_results.csv`` and ``demo_results.png``."""
    from p4q_lightning.cli import cli_main
    from p4q_lightning.plots import demo_figure
    from p4q_lightning.wandb_mode import resolve_wandb_mode

    out = Path(out) if out is not None else Path("runs") / f"demo-seed{seed}"
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"demo config {config} does not exist")
    _check_writable(out)
    resolve_wandb_mode()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    similarity: dict[str, Any] = {}
    labels: list[str] = []
    for method, quant in RUNS:
        log.info("demo run: %s %s (seed %d)", method, quant, seed)
        with warnings.catch_warnings():
            # the demo hands LightningCLI its arguments on purpose; its own argv is not Lightning's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = cli_main(run_args(seed, method, quant, out, config, overrides))
        _finish_wandb_run()  # the next run's WandbLogger must start a new W&B run
        comparison = _comparison(cli)
        for row in map(_demo_row, comparison.rows):
            rows.setdefault((row["method"], row["bits"]), row)
        if (method, quant) == RUNS[0]:  # FP vs PTQ vs P4Q at w4a4: the similarity figure
            matrices, labels = comparison.similarity
            similarity = {_matrix_title(m, quant): v.numpy() for m, v in matrices.items()}
    table = [rows[key] for key in ROW_ORDER if key in rows]
    csv_path, png_path = out / "demo_results.csv", out / "demo_results.png"
    write_csv(csv_path, table, COLUMNS)
    demo_figure(table, similarity, labels, png_path, title=f"synthetic world {seed}: top-1 / top-5")
    _log_to_wandb(seed, out, table, png_path)
    return DemoResult(table, csv_path, png_path)


def _matrix_title(method: str, quant: str) -> str:
    name = METHOD_NAMES[method]
    return "zero-shot fp32" if name == "zeroshot" else f"{name} {quant}"


def _check_writable(out: Path) -> None:
    """Fail before minutes of training, not after, when the results cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"p4q demo: cannot write to {out} ({err}); pass --out DIR") from None


def _finish_wandb_run() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _log_to_wandb(seed: int, out: Path, table: list[dict[str, Any]], figure: Path) -> None:
    """The summary table and picture as one W&B run (offline when there is no key)."""
    import wandb

    run = wandb.init(project="p4q-demo", name=f"demo-seed{seed}-summary", dir=str(out))
    try:
        data = [[row[c] for c in COLUMNS] for row in table]
        run.log(
            {
                "demo/table": wandb.Table(columns=COLUMNS, data=data),
                "demo/figure": wandb.Image(str(figure)),
            }
        )
    finally:
        run.finish()


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as aligned text."""
    header = ["method", "bits", "shots", "top-1 %", "top-5 %", "size MB"]
    body = [
        [
            r["method"],
            r["bits"],
            str(r["shots"]),
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['size_mb']:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p4q demo",
        description="Pretrain (or load) the tiny CLIP teacher of a synthetic world, quantize it, "
        "train P4Q and CoOp on 16 shots per class and compare them with zero-shot and PTQ. "
        "Arguments after `--` go to LightningCLI (e.g. -- --trainer.max_epochs 10).",
    )
    parser.add_argument("--seed", type=int, default=0, help="world, split and training seed")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/demo-seed<SEED>")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEMO_CONFIG,
        help="LightningCLI config (default: the packaged demo_cpu.yaml; "
        "another must keep its WandbLogger and ComparisonCallback)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: use a non-negative integer")
    from p4q_lightning.cli import _log_to_console

    _log_to_console()
    start = time.perf_counter()
    result = run_demo(args.seed, args.out, args.config, overrides)
    minutes = (time.perf_counter() - start) / 60
    sys.stdout.write("\n" + format_table(result.rows) + "\n\n")
    sys.stdout.write(f"seed {args.seed}: done in {minutes:.1f} min\n")
    sys.stdout.write(f"CSV:    {result.csv}\nFigure: {result.figure}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
