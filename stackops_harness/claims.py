"""The MIDAS comparison's analysis: the paper's four claims, tested paired by seed.

[`analyse`][] takes one [`stackops_harness.report.run_summary`][] per method and seed and
returns every number the report shows: per-method means with sample SDs, paired
differences with 95% confidence intervals (`stackops_harness.stats.paired`), accuracy at a
common validation loss from per-seed fits, and a verdict per claim; [`markdown`][] renders
it. The claims (the paper's, as `docs/results.md` lists them):

1. MIDAS reaches a lower validation loss than GradStack (paired difference < 0).
2. MIDAS matches the baseline's validation loss with less compute: the FLOPs speedup, and
   a paired loss difference below `LOSS_MARGIN` nats (non-inferiority).
3. At the same validation loss, MIDAS is more accurate on the reasoning primitives
   (accuracy at a common loss, from a straight-line fit per seed).
4. The gain is larger on reasoning than on closed-book recall: per seed, (reasoning gain)
   minus (recall gain) at the common loss, > 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import stats as S
from .report import common_loss, markdown_table, mean_std

__all__ = ["LOSS_MARGIN", "analyse", "markdown"]

LOSS_MARGIN = 0.02
"""Nats of validation loss within which claim 2 calls MIDAS a match for the baseline."""

Runs = Mapping[str, Mapping[int, Mapping[str, Any]]]


def _reasoning_avg(run: Mapping[str, Any], tasks: Sequence[str]) -> float:
    return float(np.mean([run["tf"][t] for t in tasks]))


def _flops_to_reach(curve: Sequence[Sequence[float]], target: float) -> float:
    for flops, loss in curve:
        if loss <= target:
            return float(flops)
    return float("nan")


def _at_loss(run: Mapping[str, Any], tasks: Sequence[str], target: float) -> float:
    pts = run["points"]
    losses = [p["val_loss"] for p in pts]
    acc = [float(np.mean([p[t] for t in tasks])) for p in pts]
    return S.accuracy_at_loss(losses, acc, target)


def _paired_dict(res: S.Paired) -> dict[str, Any]:
    return {"n": res.n, "mean": res.mean, "sd_ddof1": res.sd, "ci95": list(res.ci),
            "p": res.p, "t": res.t, "seeds": list(res.seeds)}


def analyse(
    runs: Runs,
    *,
    tasks: Sequence[str],
    reasoning_tasks: Sequence[str],
    recall_tasks: Sequence[str],
    ideal_speedup: float,
) -> dict[str, Any]:
    """Per-method numbers, paired comparisons and the claims' verdicts.

    **Arguments:**

    - `runs`: `runs[label][seed]` = `stackops_harness.report.run_summary(...)`; the labels
      `"baseline"`, `"gradstack"`, `"midas"` take part in the claims when present.
    - `tasks`: every task scored; `reasoning_tasks` and `recall_tasks` split them.
    - `ideal_speedup`: the schedule's ideal FLOPs speedup.

    **Returns:** a JSON-friendly dict: `methods`, `comparisons`, `common_loss`, `claims`.

    !!! Example

        ```python
        from stackops_harness.claims import analyse

        def run(loss, acc):
            pts = [{"val_loss": loss + 0.1, "math": acc - 0.1, "recall": 0.2},
                   {"val_loss": loss, "math": acc, "recall": 0.2}]
            return {"val_loss": loss, "flops": 1.0, "train_seconds": 1.0, "step_seconds": 1.0,
                    "eval_share": 0.1, "tf": {"math": acc, "recall": 0.2}, "points": pts,
                    "curve": [(1.0, loss)], "greedy": {}}
        runs = {"baseline": {0: run(2.0, 0.3), 1: run(2.1, 0.2), 2: run(2.0, 0.25)},
                "midas": {0: run(2.0, 0.4), 1: run(2.1, 0.3), 2: run(2.0, 0.36)}}
        out = analyse(runs, tasks=["math", "recall"], reasoning_tasks=["math"],
                      recall_tasks=["recall"], ideal_speedup=1.385)
        assert out["claims"]["3"]["verdict"] == "supported"
        ```
    """
    labels = list(runs)
    methods: dict[str, Any] = {}
    base = runs.get("baseline")
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)
        rs = [by_seed[s] for s in seeds]
        m: dict[str, Any] = {
            "seeds": seeds,
            "val_loss": [r["val_loss"] for r in rs],
            "flops": float(np.mean([r["flops"] for r in rs])),
            "train_seconds": [r["train_seconds"] for r in rs],
            "step_seconds": [r["step_seconds"] for r in rs],
            "eval_share": [r["eval_share"] for r in rs],
            "tf": {t: [r["tf"][t] for r in rs] for t in tasks},
            "reasoning_avg": [_reasoning_avg(r, reasoning_tasks) for r in rs],
            "greedy": {t: [r["greedy"].get(t) for r in rs] for t in tasks},
        }
        if base:
            bflops = float(np.mean([base[s]["flops"] for s in sorted(base)]))
            m["flops_speedup"] = bflops / m["flops"]
            wall = {s: base[s]["train_seconds"] / by_seed[s]["train_seconds"]
                    for s in seeds if s in base}
            m["wall_speedup"] = [wall[s] for s in sorted(wall)]
            reach = {s: _flops_to_reach(by_seed[s]["curve"], base[s]["val_loss"])
                     for s in seeds if s in base}
            m["flops_to_baseline_loss"] = {str(s): v for s, v in reach.items()}
        methods[label] = m

    # Accuracy at one validation loss that every baseline and MIDAS run spans.
    fit_labels = [lb for lb in ("baseline", "gradstack", "midas") if lb in runs]
    target = common_loss([r for lb in fit_labels for r in runs[lb].values()])
    for label in fit_labels:
        methods[label]["reasoning_at_common_loss"] = {
            str(s): _at_loss(r, reasoning_tasks, target) for s, r in runs[label].items()}
        methods[label]["recall_at_common_loss"] = {
            str(s): _at_loss(r, recall_tasks, target) for s, r in runs[label].items()
        } if recall_tasks else {}

    def per_seed(label: str, key: str) -> dict[int, float]:
        if key in ("reasoning_at_common_loss", "recall_at_common_loss"):
            return {int(s): v for s, v in methods[label].get(key, {}).items()}
        if key == "reasoning_avg":
            return {s: _reasoning_avg(r, reasoning_tasks) for s, r in runs[label].items()}
        if key.startswith("tf/"):
            return {s: r["tf"][key[3:]] for s, r in runs[label].items()}
        return {s: r[key] for s, r in runs[label].items()}

    comparisons: dict[str, Any] = {}
    pairs = [(a, b) for a, b in (("midas", "baseline"), ("midas", "gradstack"),
                                 ("gradstack", "baseline")) if a in runs and b in runs]
    keys = ["val_loss", "reasoning_avg", *(f"tf/{t}" for t in tasks)]
    for a, b in pairs:
        comp = {}
        for key in keys:
            comp[key] = _paired_dict(S.paired(per_seed(a, key), per_seed(b, key)))
        if not math.isnan(target):
            for key in ("reasoning_at_common_loss", "recall_at_common_loss"):
                va, vb = per_seed(a, key), per_seed(b, key)
                if va and any(not math.isnan(v) for v in va.values()):
                    comp[key] = _paired_dict(S.paired(va, vb))
        comparisons[f"{a} - {b}"] = comp

    claims = _claims(runs, methods, comparisons, per_seed, target, ideal_speedup,
                     bool(recall_tasks), (list(reasoning_tasks), list(recall_tasks)))
    return {"labels": labels, "methods": methods, "comparisons": comparisons,
            "common_loss": target, "claims": claims, "ideal_speedup": ideal_speedup,
            "loss_margin": LOSS_MARGIN}


def _claims(runs, methods, comparisons, per_seed, target, ideal, has_recall,
            split) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def missing(*labels: str) -> str | None:
        absent = [lb for lb in labels if lb not in runs]
        return f"needs {', '.join(absent)} runs" if absent else None

    # 1. MIDAS beats GradStack.
    why = missing("midas", "gradstack")
    if why:
        out["1"] = {"verdict": "not established", "evidence": why}
    else:
        c = comparisons["midas - gradstack"]["val_loss"]
        r = S.paired(per_seed("midas", "val_loss"), per_seed("gradstack", "val_loss"))
        out["1"] = {"verdict": S.verdict(r, claim="a < b"),
                    "test": "val loss, midas - gradstack < 0",
                    "evidence": r.summary(4), "numbers": c}
    # 2. MIDAS matches the baseline with less compute.
    why = missing("midas", "baseline")
    if why:
        out["2"] = {"verdict": "not established", "evidence": why}
    else:
        r = S.paired(per_seed("midas", "val_loss"), per_seed("baseline", "val_loss"))
        v = S.verdict(r, claim=f"a-b < {LOSS_MARGIN}")
        fs = methods["midas"]["flops_speedup"]
        if fs <= 1.0 and v == "supported":
            v = "not established"
        out["2"] = {"verdict": v,
                    "test": f"val loss, midas - baseline < {LOSS_MARGIN} nats, at FLOPs "
                            f"speedup {fs:.3f} (ideal {ideal:.3f})",
                    "evidence": r.summary(4), "numbers": _paired_dict(r)}
    # 3. Same loss, better reasoning. Read off each run's own accuracy-loss line at one
    # common loss where the runs' ranges overlap; where they do not, by the paired
    # regression of accuracy differences on loss differences (`stats.paired_at_equal_loss`).
    if not missing("midas", "baseline") and math.isnan(target):
        out.update(_claims_by_regression(runs, *split))
        return out
    for key, name, label in (("3", "reasoning_at_common_loss", "reasoning accuracy"),):
        why = missing("midas", "baseline")
        c = None if why else comparisons["midas - baseline"].get(name)
        if why or c is None:
            out[key] = {"verdict": "not established", "evidence": why or "no fit"}
            continue
        r = S.paired(per_seed("midas", name), per_seed("baseline", name))
        out[key] = {"verdict": S.verdict(r, claim="a > b"),
                    "test": f"{label} at val loss {target:.4f} (per-seed linear fits), "
                            "midas - baseline > 0",
                    "evidence": r.summary(3), "numbers": _paired_dict(r)}
    # 4. Reasoning gain minus recall gain.
    why = missing("midas", "baseline") or (None if has_recall else "no recall task scored")
    if why:
        out["4"] = {"verdict": "not established", "evidence": why}
    else:
        rm, rb = per_seed("midas", "reasoning_at_common_loss"), per_seed(
            "baseline", "reasoning_at_common_loss")
        cm, cb = per_seed("midas", "recall_at_common_loss"), per_seed(
            "baseline", "recall_at_common_loss")
        seeds = sorted(set(rm) & set(rb) & set(cm) & set(cb))
        gain = {s: (rm[s] - rb[s]) - (cm[s] - cb[s]) for s in seeds}
        r = S.paired(gain, {s: 0.0 for s in seeds})
        out["4"] = {"verdict": S.verdict(r, claim="a > b"),
                    "test": "(reasoning gain) - (recall gain) of midas over baseline at the "
                            "common loss > 0",
                    "evidence": r.summary(3), "numbers": _paired_dict(r)}
    return out


def _run_means(run: Mapping[str, Any], tasks: Sequence[str]) -> tuple[float, float]:
    """(mean val loss, mean accuracy over `tasks`) of a run's primitive evaluations."""
    pts = run["points"]
    return (float(np.mean([p["val_loss"] for p in pts])),
            float(np.mean([np.mean([p[t] for t in tasks]) for p in pts])))


def _claims_by_regression(
    runs: Runs, reasoning: Sequence[str], recall: Sequence[str]
) -> dict[str, Any]:
    """Claims 3 and 4 when no loss is common to every run: paired by seed, the accuracy
    difference at equal loss from regressing per-seed differences on loss differences."""
    seeds = sorted(s for s in runs["midas"] if s in runs["baseline"]
                   and runs["midas"][s]["points"] and runs["baseline"][s]["points"])
    out: dict[str, Any] = {}
    if not reasoning or len(seeds) < 3:
        why = "no common validation loss, and fewer than 3 paired seeds to regress on"
        return {"3": {"verdict": "not established", "evidence": why},
                "4": {"verdict": "not established", "evidence": why}}

    def diffs(tasks: Sequence[str]) -> tuple[dict[int, float], dict[int, float]]:
        d_acc, d_loss = {}, {}
        for s in seeds:
            lm, am = _run_means(runs["midas"][s], tasks)
            lb, ab = _run_means(runs["baseline"][s], tasks)
            d_acc[s], d_loss[s] = am - ab, lm - lb
        return d_acc, d_loss

    how = ("no loss is common to every run's evaluations, so: per seed, midas - baseline "
           "in accuracy regressed on midas - baseline in val loss (runs' means over their "
           "primitive evaluations); the intercept is the difference at equal loss")
    d_acc, d_loss = diffs(reasoning)
    r = S.paired_at_equal_loss(d_acc, d_loss)
    out["3"] = {"verdict": S.verdict(r, claim="a > b"),
                "test": f"reasoning accuracy at equal loss, midas - baseline > 0 ({how})",
                "evidence": r.summary(3), "numbers": _paired_dict(r) | {"ddof": r.ddof}}
    if not recall:
        out["4"] = {"verdict": "not established", "evidence": "no recall task scored"}
        return out
    d_rec, _ = diffs(recall)
    gain = {s: d_acc[s] - d_rec[s] for s in seeds}
    r4 = S.paired_at_equal_loss(gain, d_loss)
    out["4"] = {"verdict": S.verdict(r4, claim="a > b"),
                "test": "(reasoning gain) - (recall gain) of midas over baseline at equal "
                        f"loss > 0 ({how})",
                "evidence": r4.summary(3), "numbers": _paired_dict(r4) | {"ddof": r4.ddof}}
    return out


CLAIM_TEXT = {
    "1": "MIDAS beats GradStack (validation loss)",
    "2": "MIDAS matches the baseline's validation loss with less compute",
    "3": "At the same validation loss, MIDAS is better on reasoning",
    "4": "The gain is larger on reasoning than on closed-book recall",
}


def markdown(
    analysis: Mapping[str, Any],
    *,
    tasks: Sequence[str],
    reasoning_tasks: Sequence[str],
    floors: Mapping[str, Mapping[str, float | None]],
    shots: Mapping[str, int],
    n_eval: int,
    tf_evals: int,
) -> list[str]:
    """The report's tables and verdicts as Markdown lines (see [`analyse`][])."""
    methods = analysis["methods"]
    ideal = analysis["ideal_speedup"]
    rows = []
    for label, m in methods.items():
        reach = m.get("flops_to_baseline_loss", {})
        hit = [v for v in reach.values() if not math.isnan(v)]
        reach_cell = (f"{np.mean(hit):.3g} ({len(hit)}/{len(reach)} seeds reach it; "
                      "mean of those)") if hit else ("not reached" if reach else "–")
        rows.append([
            label, len(m["seeds"]), mean_std(m["val_loss"], 4), f"{m['flops']:.3g}",
            f"{m.get('flops_speedup', float('nan')):.3f}",
            "1.000" if label == "baseline" else f"{ideal:.3f}",
            mean_std(m["step_seconds"], 0), mean_std(m["train_seconds"], 0),
            mean_std(m.get("wall_speedup", []), 3), reach_cell,
            f"{100 * np.mean(m['eval_share']):.1f}%",
        ])
    loss_table = markdown_table(
        ["method", "seeds", "final val loss", "train FLOPs", "FLOPs speedup", "ideal",
         "steps wall s", "steps+growth wall s", "wall speedup (steps+growth)",
         "FLOPs to baseline loss", "eval share of run time"], rows)

    prow = []
    for label, m in methods.items():
        prow.append([label] + [mean_std(m["tf"][t]) for t in tasks]
                    + [mean_std(m["reasoning_avg"])])
    for name in ("uniform", "informed", "shortcut", "floor"):
        cells = [("–" if floors[t][name] is None else f"{floors[t][name]:.3f}") for t in tasks]
        avg = np.mean([floors[t]["floor"] for t in reasoning_tasks]) if name == "floor" else None
        prow.append([f"*{name}*"] + cells + ["–" if avg is None else f"{avg:.3f}"])
    prim_table = markdown_table(
        ["method"] + [f"{t} ({shots[t]}-shot)" for t in tasks] + ["reasoning avg"], prow)

    crow = []
    for pair, comp in analysis["comparisons"].items():
        for key, c in comp.items():
            crow.append([pair, key, f"{c['mean']:+.4f}",
                         f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]", f"{c['p']:.2g}",
                         f"{c['sd_ddof1']:.4f}", c["n"]])
    comp_table = markdown_table(
        ["comparison", "quantity", "mean difference", "95% CI", "p", "SD (ddof=1)", "n"], crow)

    claim_rows = [[k, CLAIM_TEXT[k], c.get("test", "–"), c["evidence"], f"**{c['verdict']}**"]
                  for k, c in analysis["claims"].items()]
    claims_table = markdown_table(["#", "claim", "test", "numbers", "verdict"], claim_rows)

    grow = []
    for label, m in methods.items():
        if any(v is not None for t in tasks for v in m["greedy"][t]):
            grow.append([label] + [mean_std([v for v in m["greedy"][t] if v is not None])
                                   for t in tasks])
    greedy_table = markdown_table(["method"] + list(tasks), grow) if grow else ""
    target = analysis["common_loss"]
    return [
        "## Verdicts", "", claims_table, "",
        "Verdicts come from paired comparisons by seed: *supported* when the 95% confidence "
        "interval (t-distribution, n - 1 degrees of freedom) lies on the claimed side, "
        "*contradicted* when it lies on the other, *not established* otherwise. "
        f"Claim 2's margin: {analysis['loss_margin']} nats. "
        + (f"Claims 3 and 4 use accuracy at validation loss {target:.4f}, the highest of the "
           "runs' lowest losses, read off a straight-line fit of each run's accuracy against "
           "its validation loss over its primitive evaluations."
           if not math.isnan(target) else
           "Claims 3 and 4: the runs' validation losses at their primitive evaluations share "
           "no common value, so each seed's accuracy difference (MIDAS − baseline, means "
           "over the evaluations) is regressed on its loss difference; the intercept is the "
           "difference at equal loss (a paired analysis of covariance, t-interval with n − 2 "
           "degrees of freedom; it assumes one accuracy-loss slope for both methods)."),
        "", "## Loss, compute and time", "", loss_table, "",
        "Means ± sample standard deviations (ddof=1) over seeds. *Steps wall s* is the "
        "training steps' wall time; *steps+growth* adds growth; the wall speedup is the "
        "per-seed ratio baseline / method of steps+growth time (compilation, evaluation and "
        "checkpoints left out). *FLOPs to baseline loss*: FLOPs at the first evaluation at or "
        "below the same seed's baseline final loss, averaged over the seeds that reach it.",
        "", "## Reasoning primitives (teacher-forced exact match)", "", prim_table, "",
        f"Accuracy on {n_eval} held-out prompts per task, every answer token the argmax given "
        "the prompt and the answer's earlier tokens, averaged over the last "
        f"{tf_evals} evaluations; k complete shots per prompt as in the column headers (the "
        "most that fit the context, at most 5). *reasoning avg* leaves out `recall` (the "
        "closed-book control). Floors: *uniform* chance; *informed* guess (format known, "
        "computation not); *shortcut*: a literal whose variable is used on some right-hand "
        "side (variable assignment); *floor* is the highest.",
        "", "## Paired differences", "", comp_table, "",
        *(["## Greedy generation check (final evaluation)", "", greedy_table, ""]
          if greedy_table else []),
    ]
