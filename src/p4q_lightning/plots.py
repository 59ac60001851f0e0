"""Figures for comparisons and sweeps (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_bars(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars of top-1 and top-5 per method (one bar group per row)."""
    labels = [f"{r['method']}\n{r['bits']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    for offset, key, color in ((-0.2, "top1", "#3b6ea8"), (0.2, "top5", "#a8c6e8")):
        values = [100 * float(r[key]) for r in rows]
        bars = ax.bar(x + offset, values, 0.4, label=key.replace("top", "top-"), color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "FP vs PTQ vs P4Q on the test split")
    return _save(fig, path)


def _draw_similarity(
    fig: Any, axes: Sequence[Any], matrices: Mapping[str, np.ndarray], labels: Sequence[str]
) -> None:
    """One matrix per axis with a shared colour scale and one colour bar."""
    lo = min(float(np.min(m)) for m in matrices.values())
    hi = max(float(np.max(m)) for m in matrices.values())
    n = len(labels)
    image = None
    for ax, name in zip(axes, matrices, strict=False):
        image = ax.imshow(matrices[name], vmin=lo, vmax=hi, cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(n), [s[:12] for s in labels], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [s[:12] for s in labels], fontsize=6)
        ax.set_xlabel("text (class)", fontsize=8)
    axes[0].set_ylabel("image (label)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")


def similarity_matrices(
    matrices: Mapping[str, np.ndarray], labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Image-text cosine-similarity matrices side by side, one shared colour scale (P4Q Fig. 1).

    Rows are test images, columns the text features of their classes, so a well-aligned model
    shows a bright diagonal.
    """
    names = list(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(0.5 + 3.2 * len(names), 3.4), squeeze=False)
    _draw_similarity(fig, axes[0].tolist(), matrices, labels)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def demo_figure(
    rows: Sequence[Mapping[str, Any]],
    matrices: Mapping[str, np.ndarray],
    labels: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """The demo's one picture: top-1/top-5 bars per method (top) over similarity matrices.

    ``rows`` hold ``method``, ``bits``, ``top1`` and ``top5`` in percent.
    """
    n = max(1, len(matrices))
    fig = plt.figure(figsize=(max(9.0, 3.2 * n + 0.5), 7.6))
    grid = fig.add_gridspec(2, n, height_ratios=[1.0, 1.1], hspace=0.55)
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(len(rows))
    for offset, key, color in ((-0.2, "top1", "#3b6ea8"), (0.2, "top5", "#a8c6e8")):
        bars = ax.bar(x + offset, [float(r[key]) for r in rows], 0.4, label=key, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [f"{r['method']}\n{r['bits']}" for r in rows])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "accuracy on the test split")
    if matrices:
        axes = [fig.add_subplot(grid[1, i]) for i in range(n)]
        _draw_similarity(fig, axes, matrices, labels)
    return _save(fig, path)


def accuracy_vs_bits_and_shots(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Sweep figure: top-1 vs weight bits (one line per method and shots) and vs shots."""
    fig, (ax_bits, ax_shots) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[tuple[str, Any], list[tuple[float, float]]] = {}
    by_bits: dict[tuple[str, Any], list[tuple[float, float]]] = {}
    for r in rows:
        bits, shots, top1 = r.get("w_bits"), r.get("shots"), 100 * float(r["top1"])
        if bits is not None and not (isinstance(bits, float) and math.isnan(bits)):
            series.setdefault((r["method"], shots), []).append((float(bits), top1))
        if shots is not None and r["method"] not in ("fp32 zero-shot", "ptq"):
            by_bits.setdefault((r["method"], bits), []).append((float(shots), top1))
    for (method, shots), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        label = method if shots in (None, 0) else f"{method}, {shots}-shot"
        ax_bits.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax_bits.set_xscale("log", base=2)
    ax_bits.set_xticks([2, 4, 6, 8, 16, 32], ["2", "4", "6", "8", "16", "32"])
    ax_bits.set_xlabel("weight bits")
    ax_bits.set_ylabel("top-1 (%)")
    ax_bits.set_title("accuracy vs bits")
    for (method, bits), pts in sorted(by_bits.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        ax_shots.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{method}, {bits}-bit")
    ax_shots.set_xlabel("shots per class")
    ax_shots.set_title("accuracy vs shots")
    for ax in (ax_bits, ax_shots):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


Points = Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]]


def _panels(points: Points, xlabel: str, path: str | Path, title: str, log2_x: bool) -> Path:
    """One panel per key of ``points`` (a line per series: x, mean, std; the std as a band),
    one legend beside the panels with the full series names."""
    names = list(points)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    series = sorted({s for panel in points.values() for s in panel})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
    styles = {s: "--" if s.startswith(("fp32 zero-shot", "ptq")) else "-" for s in series}
    for ax, name in zip(axes.flat, names, strict=False):
        for s in series:
            pts = sorted(points[name].get(s, ()))
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            mean = np.array([p[1] for p in pts])
            std = np.array([p[2] for p in pts])
            ax.plot(x, mean, styles[s], marker="o", color=colors[s], label=s)
            if np.any(std > 0):
                ax.fill_between(x, mean - std, mean + std, color=colors[s], alpha=0.2)
        xs = sorted({p[0] for pts in points[name].values() for p in pts})
        if log2_x and xs and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[s], ls=styles[s], marker="o") for s in series]
    fig.legend(handles, series, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def fewshot_curves(points: Points, path: str | Path) -> Path:
    """Top-1 vs shots per dataset (and the average), a line per method and bits, mean ± std
    over seeds as a band (CoOp's Figure 3)."""
    return _panels(
        points, "shots per class", path, "few-shot top-1 (mean ± std over seeds)", log2_x=True
    )


def accuracy_vs_bits(points: Points, path: str | Path) -> Path:
    """Top-1 vs weight bits per dataset, a line per method, mean ± std over seeds as a band."""
    return _panels(points, "weight bits", path, "top-1 vs bit width (mean ± std over seeds)", True)
