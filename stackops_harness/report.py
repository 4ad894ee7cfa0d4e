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
    "tf_points",
    "run_summary",
    "common_loss",
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
    curves: Mapping[str, Sequence[dict[str, np.ndarray]]],
    path: str | Path,
    *,
    title: str = "",
    time_curves: Mapping[str, Sequence[dict[str, np.ndarray]]] | None = None,
) -> Path:
    """Validation loss against FLOPs and against training wall time, one line per method.

    `curves[method]` is a list of `eval_curve` results, one per seed: the mean is drawn, with
    the min-max band when there are several seeds. `time_curves`, if given, replaces
    `curves` in the wall-time panel (e.g. to leave out a seed whose timing was disturbed).
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
    panels = ((axes[0], "flops", "training FLOPs", curves),
              (axes[1], "seconds", "training wall time (s)", time_curves or curves))
    for ax, x_key, label, panel in panels:
        for method, runs in panel.items():
            if not runs:
                continue
            n = min(len(r["val_loss"]) for r in runs)
            if n == 0:
                continue
            xs = np.mean([r[x_key][:n] for r in runs], axis=0)
            ys = np.array([r["val_loss"][:n] for r in runs])
            color = COLORS.get(method.split(":")[0].split("[")[0]) if method in COLORS else None
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
    `floors[task]`, if given, is drawn as a dashed line (the highest guesser floor).
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
            ax.axhline(floors[task], ls="--", lw=1, color="gray", label="floor")
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


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`"m ± s"` with the sample standard deviation (ddof=1), or `"m"` for one value;
    `"–"` for no values.

    !!! Example

        ```python
        from stackops_harness.report import mean_std

        assert mean_std([1.0, 3.0]) == "2.000 ± 1.414"
        ```
    """
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


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


# --------------------------------------------------------------------------- MIDAS comparison


def tf_points(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """The evaluations that scored the primitives (teacher forcing): step, loss, accuracies.

    !!! Example

        ```python
        from stackops_harness.report import tf_points

        recs = [{"kind": "eval", "step": 10, "val_loss": 2.0, "tf/math": 0.5}]
        assert tf_points(recs, ["math"]) == [{"step": 10, "val_loss": 2.0, "math": 0.5}]
        ```
    """
    out = []
    for r in records:
        if r.get("kind") == "eval" and all(f"tf/{t}" in r for t in tasks):
            out.append({"step": r["step"], "val_loss": r["val_loss"],
                        **{t: r[f"tf/{t}"] for t in tasks}})
    return out


def run_summary(
    records: Sequence[Mapping[str, Any]], tasks: Sequence[str], *, last: int = 3
) -> dict[str, Any]:
    """One run's numbers for the report, from its `metrics.jsonl` records.

    `tf[task]` is the teacher-forced accuracy averaged over the `last` primitive
    evaluations; `train_seconds` counts steps and growth, `step_seconds` steps only;
    `primitive_seconds` is the time the primitive evaluations took, and `eval_share` the
    whole evaluation time (validation loss and primitives) over the run's total.

    !!! Example

        ```python
        from stackops_harness.report import run_summary

        recs = [{"kind": "eval", "step": s, "val_loss": 3.0 - s / 10, "flops": s * 1.0,
                 "tf/math": s / 10, "time_train": s, "time_eval": 1.0, "time_total": s + 1}
                for s in (1, 2, 3)]
        out = run_summary(recs, ["math"], last=2)
        assert abs(out["tf"]["math"] - 0.25) < 1e-12 and out["val_loss"] == 2.7
        ```
    """
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        raise ValueError("`records` has no evaluation records.")
    end = next((r for r in reversed(records) if r.get("kind") == "end"), evals[-1])
    pts = tf_points(records, tasks)
    final = evals[-1]
    prim = [r.get("primitive_seconds", 0.0) for r in evals]
    return {
        "val_loss": float(final["val_loss"]),
        "flops": float(final.get("flops", float("nan"))),
        "train_seconds": train_seconds(final),
        "step_seconds": float(final.get("time_train", 0.0)),
        "primitive_seconds": float(sum(prim)),
        "eval_share": float(end.get("time_eval", 0.0)) / max(float(end.get("time_total", 0.0)),
                                                              1e-9),
        "tf": {t: float(np.mean([p[t] for p in pts[-last:]])) if pts else float("nan")
               for t in tasks},
        "tf_evals": len(pts[-last:]),
        "points": pts,
        "greedy": {t: final[f"greedy/{t}"] for t in tasks if f"greedy/{t}" in final},
        "curve": [(float(r.get("flops", float("nan"))), float(r["val_loss"])) for r in evals],
    }


def common_loss(runs: Sequence[Mapping[str, Any]]) -> float:
    """A validation loss that every run's primitive evaluations span: the highest of the
    runs' lowest losses (`nan` if some run's points do not reach up to it).

    !!! Example

        ```python
        from stackops_harness.report import common_loss

        runs = [{"points": [{"val_loss": 2.0}, {"val_loss": 1.8}]},
                {"points": [{"val_loss": 1.95}, {"val_loss": 1.85}]}]
        assert common_loss(runs) == 1.85
        ```
    """
    spans = [[p["val_loss"] for p in r["points"]] for r in runs if r["points"]]
    if not spans or len(spans) < len(runs):
        return float("nan")
    target = max(min(s) for s in spans)
    return target if all(max(s) >= target for s in spans) else float("nan")


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"



def midas_report(
    out: Path,
    methods: Sequence[str],
    label: Any,
    n_seeds: int,
    configs: Mapping[tuple[str, int], Any],
    suite: Any,
    corpus_meta: Mapping[str, Any],
    *,
    preset: str,
    tf_evals: int,
) -> tuple[dict[str, Any], list[str]]:
    """Build `report.md`, `results.json` and the plots of a MIDAS comparison in `out`.

    Every finished run (`LABEL-seedS/final_eval.json`) with `S < n_seeds` takes part, so a
    report can be rebuilt after each sitting. Returns the results dict and the Markdown
    lines.
    """
    import json

    import stackops as so

    from . import claims as Cl
    from . import primitives as P
    from .metrics import read_metrics

    tasks = list(suite.cfg.tasks)
    reasoning = [t for t in tasks if t in P.REASONING_TASKS]
    recall = [t for t in tasks if t not in P.REASONING_TASKS]
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    sims: dict[str, np.ndarray] = {}
    curves: dict[str, list[dict[str, np.ndarray]]] = {}
    for method in methods:
        for seed in range(n_seeds):
            run_dir = Path(out) / f"{label(method)}-seed{seed}"
            if not (run_dir / "final_eval.json").exists():
                continue
            recs = read_metrics(run_dir / "metrics.jsonl")
            runs.setdefault(label(method), {})[seed] = run_summary(recs, tasks, last=tf_evals)
            curves.setdefault(label(method), []).append(eval_curve(recs))
            if label(method) not in sims and (run_dir / "layer_similarity.npy").exists():
                sims[label(method)] = np.load(run_dir / "layer_similarity.npy")
    if not runs:
        raise ValueError(f"No finished runs in {out}.")
    cfg0 = configs[next(iter(configs))]
    ideal = so.ideal_speedup(cfg0.stages, cfg0.alpha)
    analysis = Cl.analyse(runs, tasks=tasks, reasoning_tasks=reasoning, recall_tasks=recall,
                          ideal_speedup=ideal)
    floors = suite.floors
    eval_math = P.math_kind_shares(suite.examples["math"]) if "math" in tasks else {}
    schedule = list(so.prop_schedule(cfg0.total_steps, cfg0.stages, cfg0.alpha))
    md = [
        f"# MIDAS at small scale: {preset} preset", "",
        f"Final model: {cfg0.depth} blocks of width {cfg0.d_model}, context {cfg0.seq_len}, "
        f"{cfg0.total_steps} steps of {cfg0.global_batch} sequences; growth methods train "
        f"{cfg0.stages} stages (Prop-{cfg0.alpha:g}: {schedule}). Seeds per method: "
        + ", ".join(f"{lb} {len(r)}" for lb, r in runs.items()) + ". Corpus: Python stdlib "
        f"sources with {corpus_meta['synthetic_fraction_actual']:.0%} of the tokens synthetic "
        "primitive examples (shares by task: " + ", ".join(
            f"{t} {w:.0%}" for t, w in corpus_meta["settings"]["task_weights"].items()) + ").",
        "",
        *Cl.markdown(analysis, tasks=tasks, reasoning_tasks=reasoning, floors=floors,
                     shots=suite.shots, n_eval=suite.cfg.n_eval, tf_evals=tf_evals),
    ]
    if eval_math:
        train_math = corpus_meta.get("math_kind_shares") or {}
        md += ["## Math: evaluation against training distribution", "",
               "Share of prompts by number of operations: evaluation set "
               + ", ".join(f"{k} ops {v:.1%}" for k, v in eval_math.items())
               + "; training text " + (", ".join(f"{k} ops {float(v):.1%}"
                                                  for k, v in train_math.items())
                                       if train_math else "not recorded") + ".", ""]
    plot_loss_curves(curves, Path(out) / "loss_vs_flops_and_time.png",
                     title=f"{preset}: validation loss")
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for lb, by_seed in runs.items():
        for r in by_seed.values():
            for p in r["points"]:
                for t in tasks:
                    panels.setdefault(t, {}).setdefault(lb, []).append((p["val_loss"], p[t]))
    plot_accuracy_panels(panels, Path(out) / "primitives_vs_loss.png",
                         floors={t: float(floors[t]["floor"]) for t in tasks},
                         title="teacher-forced accuracy against validation loss (seeds pooled)")
    if sims:
        plot_similarity(sims, Path(out) / "layer_similarity.png")
    md += ["![loss](loss_vs_flops_and_time.png)", "",
           "![primitives vs loss](primitives_vs_loss.png)", "",
           "![layer similarity](layer_similarity.png)", ""]
    summary = {**analysis, "floors": floors, "shots": suite.shots,
               "n_eval": suite.cfg.n_eval, "tf_evals": tf_evals,
               "math_kind_shares": {"eval": eval_math,
                                    "train": corpus_meta.get("math_kind_shares")}}
    (Path(out) / "report.md").write_text("\n".join(md))
    (Path(out) / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary, md
