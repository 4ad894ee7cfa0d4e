"""Recompute every number that docs/results.md quotes about the earlier three-seed run
(`results/midas-earlier-eval/`, the evaluation before the corrected one) and the ablations
from the committed results files, and regenerate the plots whose labels or seeds the
committed versions got wrong. The eight-seed run with the corrected evaluation
(`results/midas-default/`) is reported by `stackops-midas` itself (its `report.md` and
`results.json`).

    python results/recompute.py          # from the repository root; prints JSON, writes plots

Standard deviations are sample SDs (ddof=1); paired comparisons use
`stackops_harness.stats.paired` (t-distribution, 95% intervals).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stackops_harness import report as Rep
from stackops_harness import stats as S
from stackops_harness.metrics import read_metrics

ROOT = Path(__file__).parent
MAIN = ROOT / "midas-earlier-eval"
METHODS = ("baseline", "gradstack", "midas")
TASKS = ("induction", "varassign_d0", "varassign_d1", "varassign_d2", "math")


def records(folder: Path, label: str, seed: int) -> list[dict]:
    return read_metrics(folder / f"{label}-seed{seed}" / "metrics.jsonl")


def final(recs: list[dict]) -> dict:
    return [r for r in recs if r.get("kind") == "eval"][-1]


def main() -> dict:
    out: dict = {}
    seeds = range(3)
    fin = {m: [final(records(MAIN, m, s)) for s in seeds] for m in METHODS}
    ends = {m: [json.loads((MAIN / f"{m}-seed{s}" / "final_eval.json").read_text())
                for s in seeds] for m in METHODS}
    # Loss, paired tests against the baseline and between growth methods.
    out["val_loss"] = {m: {"per_seed": [f["val_loss"] for f in fin[m]],
                           "mean_sd_ddof1": S.mean_sd([f["val_loss"] for f in fin[m]]),
                           "sd_ddof0": float(np.std([f["val_loss"] for f in fin[m]]))}
                       for m in METHODS}
    loss = {m: [f["val_loss"] for f in fin[m]] for m in METHODS}
    out["paired_val_loss"] = {
        f"{a} - {b}": S.paired(loss[a], loss[b]).__dict__
        for a, b in (("gradstack", "baseline"), ("midas", "baseline"), ("midas", "gradstack"))}
    # Wall time per seed: steps only, and steps + growth (train_seconds).
    out["wall"] = {m: {"steps_s": [f["time_train"] for f in fin[m]],
                       "steps_grow_s": [Rep.train_seconds(f) for f in fin[m]]}
                   for m in METHODS}
    out["gradstack_over_midas_steps"] = [
        g["time_train"] / m["time_train"] - 1 for g, m in zip(fin["gradstack"], fin["midas"])]
    flops = {m: float(np.mean([f["flops"] for f in fin[m]])) for m in METHODS}
    out["flops"] = flops
    out["flops_speedup"] = {m: flops["baseline"] / flops[m] for m in METHODS}
    quiet = (1, 2)  # seed 0's baseline was slowed by a benchmark sharing the machine
    for key in ("steps_s", "steps_grow_s"):
        base = np.mean([out["wall"]["baseline"][key][s] for s in quiet])
        out[f"wall_speedup_quiet_{key}"] = {
            m: float(base / np.mean([out["wall"][m][key][s] for s in quiet])) for m in METHODS}
    out["wall_vs_flops_shortfall_quiet_steps_grow"] = {
        m: 1 - out["wall_speedup_quiet_steps_grow_s"][m] / out["flops_speedup"][m]
        for m in METHODS}
    # FLOPs to the same seed's baseline final loss.
    reach = {}
    for m in METHODS:
        hits = []
        for s in seeds:
            c = Rep.eval_curve(records(MAIN, m, s))
            idx = np.nonzero(c["val_loss"] <= fin["baseline"][s]["val_loss"])[0]
            hits.append(float(c["flops"][idx[0]]) if idx.size else None)
        reach[m] = hits
    out["flops_to_baseline_loss_per_seed"] = reach
    # Primitives (old evaluation: greedy 5-shot on 100 prompts; FT-64).
    out["fewshot"] = {m: {t: {"per_seed": [f[f"fewshot/{t}"] for f in fin[m]],
                              "mean_sd_ddof1": S.mean_sd([f[f"fewshot/{t}"] for f in fin[m]])}
                          for t in (*TASKS, "avg")} for m in METHODS}
    out["finetune"] = {m: {t: S.mean_sd([e["finetune"][t]["mean"] for e in ends[m]])
                           for t in TASKS} for m in METHODS}
    out["finetune_avg"] = {m: S.mean_sd([np.mean([e["finetune"][t]["mean"] for t in TASKS])
                                         for e in ends[m]]) for m in METHODS}
    out["paired_math_fewshot"] = {
        f"{a} - baseline": S.paired(out["fewshot"][a]["math"]["per_seed"],
                                    out["fewshot"]["baseline"]["math"]["per_seed"]).__dict__
        for a in ("gradstack", "midas")}
    out["detectable_math_fewshot_16_seeds"] = {
        pair: S.detectable_difference(v["sd"], 16)
        for pair, v in out["paired_math_fewshot"].items()}
    plots(fin)
    return out


def plots(fin: dict) -> None:
    """The main run's loss plot with the wall-time panel on the quiet seeds only, and the
    ablation plots labelled by variant, with the main run's baseline for reference."""
    curves = {m: [Rep.eval_curve(records(MAIN, m, s)) for s in range(3)] for m in METHODS}
    quiet = {m: [c for i, c in enumerate(runs) if i in (1, 2)] for m, runs in curves.items()}
    Rep.plot_loss_curves(curves, MAIN / "loss_vs_flops_and_time.png",
                         title="default: validation loss (FLOPs: 3 seeds; wall time: seeds 1, 2)",
                         time_curves=quiet)
    for folder, label in (("abl-zero", "midas[opt_policy=zero]"),
                          ("abl-preserve", "midas[preserve=true]")):
        runs = {"baseline": [Rep.eval_curve(records(MAIN, "baseline", s)) for s in (0, 1)],
                "midas": [Rep.eval_curve(records(MAIN, "midas", s)) for s in (0, 1)],
                label: [Rep.eval_curve(records(ROOT / folder, label, s)) for s in (0, 1)]}
        Rep.plot_loss_curves(runs, ROOT / folder / "loss_vs_flops_and_time.png",
                             title=f"{label} against the main run's baseline and midas "
                                   "(seeds 0, 1)")
    abl = ROOT / "abl-methods"
    runs = {m: [Rep.eval_curve(records(abl, m, s)) for s in (0, 1)]
            for m in ("baseline", "midas", "interpolate", "lidas")}
    Rep.plot_loss_curves(runs, abl / "loss_vs_flops_and_time.png",
                         title="growth variants (seeds 0, 1)")
    # The ablation folders' primitive and similarity plots, labelled by variant and drawn
    # next to the main run's baseline and MIDAS (seeds 0, 1; the earlier evaluation).
    folders = {"abl-zero": ["midas[opt_policy=zero]"], "abl-preserve": ["midas[preserve=true]"],
               "abl-methods": ["interpolate", "lidas"]}
    for folder, labels in folders.items():
        where = {"baseline": MAIN, "midas": MAIN, **{lb: ROOT / folder for lb in labels}}
        sims = {lb: np.load(d / f"{lb}-seed0" / "layer_similarity.npy")
                for lb, d in where.items()}
        Rep.plot_similarity(sims, ROOT / folder / "layer_similarity.png")
        panels = {t: {lb: [(r["val_loss"], r[f"fewshot/{t}"]) for s in (0, 1)
                           for r in records(d, lb, s)
                           if r.get("kind") == "eval" and f"fewshot/{t}" in r and r["step"] > 0]
                      for lb, d in where.items()} for t in TASKS}
        Rep.plot_accuracy_panels(panels, ROOT / folder / "primitives_vs_loss.png",
                                 title=f"{', '.join(labels)} against the main run's baseline "
                                       "and midas: 5-shot accuracy (earlier evaluation; "
                                       "seeds 0, 1)")


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=float))
