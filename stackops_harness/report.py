"""Plots and Markdown tables for comparing growth methods (used by `midas.py`, `looped.py`).

All functions take plain data (metrics records from `metrics.jsonl`, dicts of results) and
write PNG files with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "eval_curve",
    "train_seconds",
    "plot_loss_curves",
    "plot_accuracy_panels",
    "plot_similarity",
    "markdown_table",
    "mean_std",
]

COLORS = {"baseline": "#444444", "gradstack": "#1f77b4", "midas": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def train_seconds(rec: Mapping[str, Any]) -> float:
    """Wall time spent training so far: steps and growth.

    Compilation is left out (reported on its own): runs in one process share a cache of
    compiled steps, so it would favour whichever method runs second. Evaluation and
    checkpoints are left out as measurement overhead.
    """
    return float(rec.get("time_train", 0.0) + rec.get("time_grow", 0.0))


def eval_curve(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Validation-loss records as arrays: step, flops, train seconds, val_loss.

    !!! Example

        ```python
        from stackops_harness.report import eval_curve

        c = eval_curve([{"kind": "eval", "step": 1, "flops": 2.0, "val_loss": 3.0}])
        assert c["val_loss"].tolist() == [3.0]
        ```
    """
    ev = [r for r in records if r.get("kind") == "eval"]
    return {
        "step": np.array([r["step"] for r in ev]),
        "flops": np.array([r.get("flops", np.nan) for r in ev], dtype=float),
        "seconds": np.array([train_seconds(r) for r in ev], dtype=float),
        "val_loss": np.array([r["val_loss"] for r in ev], dtype=float),
    }


def _finish(fig: Any, path: str | Path, *, title: str = "", dpi: int = 110) -> Path:
    """Title, layout, save as PNG, close: the end of every plot here."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def plot_loss_curves(
    curves: Mapping[str, Sequence[dict[str, np.ndarray]]], path: str | Path, *, title: str = ""
) -> Path:
    """Validation loss against FLOPs and against training wall time, one line per method.

    `curves[method]` is a list of `eval_curve` results, one per seed: the mean is drawn, with
    the min-max band when there are several seeds.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # Zoom on the part where the methods differ: the untrained first evaluation is far
    # above the rest (the y-axis ends one nat above the highest final loss).
    runs_with_evals = [r for runs in curves.values() for r in runs if len(r["val_loss"])]
    ylim = (
        (min(np.nanmin(r["val_loss"]) for r in runs_with_evals) - 0.05,
         max(r["val_loss"][-1] for r in runs_with_evals) + 1.0)
        if runs_with_evals else None
    )
    for ax, x_key, label in ((axes[0], "flops", "training FLOPs"), (axes[1], "seconds", "training wall time (s)")):
        for method, runs in curves.items():
            if not runs:
                continue
            n = min(len(r["val_loss"]) for r in runs)
            if n == 0:
                continue
            xs = np.mean([r[x_key][:n] for r in runs], axis=0)
            ys = np.array([r["val_loss"][:n] for r in runs])
            color = COLORS.get(method.split(":")[0])
            ax.plot(xs, ys.mean(0), label=method, color=color, marker=".", ms=3)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        if ylim is not None:
            ax.set_ylim(*ylim)
    axes[0].legend()
    return _finish(fig, path, title=title)


def plot_accuracy_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | Path,
    *,
    floors: Mapping[str, float] | None = None,
    title: str = "",
) -> Path:
    """Accuracy against validation loss, one panel per task, one series per method.

    `panels[task][method]` is a list of `(val_loss, accuracy)` pairs (seeds pooled);
    `floors[task]`, if given, is drawn as a dashed line (e.g. the informed-guess floor).
    """
    plt = _plt()
    n = len(panels)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (task, points) in zip(axes.flat, panels.items()):
        for method, pts in points.items():
            if not pts:
                continue
            arr = np.array(pts)
            ax.scatter(arr[:, 0], arr[:, 1], s=12, alpha=0.7, label=method,
                       color=COLORS.get(method))
        if floors and task in floors:
            ax.axhline(floors[task], ls="--", lw=1, color="gray", label="informed guess")
        ax.invert_xaxis()
        ax.set_title(task)
        ax.set_xlabel("validation loss (lower →)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _finish(fig, path, title=title, dpi=100)


def plot_similarity(mats: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Heatmaps of layer-pair cosine similarity, one panel per method."""
    plt = _plt()
    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    im = None
    for ax, (name, m) in zip(axes[0], mats.items()):
        im = ax.imshow(m, vmin=-0.1, vmax=1.0, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def mean_std(values: Sequence[float]) -> str:
    """`"m ± s"` (or `"m"` for one value), with 3 decimals; `"–"` for no values.

    !!! Example

        ```python
        from stackops_harness.report import mean_std

        assert mean_std([1.0, 3.0]) == "2.000 ± 1.000"
        ```
    """
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    !!! Example

        ```python
        from stackops_harness.report import markdown_table

        print(markdown_table(["a", "b"], [[1, 2]]))
        ```
    """
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
