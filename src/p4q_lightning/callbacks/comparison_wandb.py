"""The comparison in Weights & Biases: its table, a top-1 bar chart and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p4q_lightning.callbacks.comparison_files import COLUMNS


def log_to_wandb(run: Any, rows: list[dict[str, Any]], files: dict[str, Path]) -> None:
    """The comparison table, a top-1 bar chart and the figures, in one W&B log call."""
    import wandb

    table = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])
    payload: dict[str, Any] = {
        "comparison/table": table,
        "comparison/top1_bar": wandb.plot.bar(table, "method", "top1", title="top-1 by method"),
    }
    for key in ("accuracy", "similarity"):
        if key in files:
            payload[f"comparison/{key}"] = wandb.Image(str(files[key]))
    run.log(payload)
