"""Baseline vs GradStack vs MIDAS at small scale: loss, compute, wall time, reasoning primitives.

    python experiments/midas.py --preset smoke            # about a minute
    python experiments/midas.py                           # default preset, ~14 min on 2 CPU cores
    python experiments/midas.py --preset gpu --seeds 3    # 118M parameters, for an accelerator
    python experiments/midas.py --alpha 2 --out runs/midas-a2
    python experiments/midas.py --ablation opt_policy=zero --methods midas --out runs/abl-zero

Every method trains the same final architecture on the same data, seed and step budget;
growth methods use `--stages` stages (6 by default, as in the paper) with the Prop-α
schedule. The pretraining text is the Python standard library's sources with a share of
synthetic primitive examples mixed in (`stackops_harness.corpus.MIX` says why). Each method's run
directory holds its metrics, checkpoints and evaluations; the output folder gets
`report.md`, `results.json`, `config.json` and PNG plots, and the table is printed at the
end. Finished runs are reused, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from stackops_harness.corpus import MIX, corpus_dir

PRESETS: dict[str, dict[str, Any]] = {
    # About a minute: a tiny model, 3 stages; numbers mean nothing, the pipeline is exercised.
    "smoke": dict(
        train=dict(
            d_model=32, n_heads=2, depth=3, stages=3, seq_len=64, global_batch=8,
            total_steps=60, warmup_steps=6, lr=3e-3, eval_every=20, eval_batches=2,
            ckpt_every=0, log_every=10, keep_checkpoints=1,
        ),
        prim=dict(n_eval=16, ft_steps=4, ft_runs=2, ft_batch=8),
        corpus=dict(MIX, max_mb=2.0),
    ),
    # About 13.5 minutes per seed measured on 2 quiet CPU cores for the three methods
    # (training ~9 min, fine-tuning evaluations ~4.5 min).
    "default": dict(
        train=dict(
            d_model=64, n_heads=4, depth=6, stages=6, seq_len=128, global_batch=16,
            total_steps=1500, warmup_steps=60, lr=3e-3, eval_every=150, eval_batches=8,
            ckpt_every=0, log_every=25, keep_checkpoints=1,
        ),
        prim=dict(n_eval=100, ft_steps=40, ft_runs=3, ft_batch=16),
        corpus=dict(MIX, max_mb=20.0),
    ),
    # An accelerator: 118M parameters at the final depth (24 layers of width 640), bf16.
    "gpu": dict(
        train=dict(
            d_model=640, n_heads=10, depth=24, stages=6, seq_len=512, global_batch=64,
            total_steps=20000, warmup_steps=500, lr=1e-3, eval_every=1000, eval_batches=16,
            eval_batch=32, ckpt_every=2000, log_every=50, compute_dtype="bfloat16",
        ),
        prim=dict(n_eval=500, ft_steps=100, ft_runs=3, ft_batch=32),
        corpus=dict(MIX, max_mb=20.0),
    ),
}

METHODS = ("baseline", "gradstack", "midas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/midas-PRESET)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    p.add_argument("--seeds", type=int, default=1, help="repeat every method with seeds 0..N-1")
    p.add_argument("--stages", type=int, default=None, help="number of stages (default: preset)")
    p.add_argument("--alpha", type=float, default=None, help="Prop-alpha exponent (default 1)")
    p.add_argument("--steps", type=int, default=None, help="total step budget per method")
    p.add_argument(
        "--ablation", action="append", default=[], metavar="KEY=VALUE",
        help="a TrainConfig override applied to growth methods only (opt_policy=zero, "
        "preserve=true, ...); the report labels the runs with it",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for every method")
    p.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of synthetic documents in the pretraining tokens (default: preset)")
    p.add_argument("--task-weights", default=None, metavar="TASK=W,...",
                   help="relative shares of the primitive tasks in the synthetic tokens "
                   "(default: preset; missing tasks get 0)")
    p.add_argument("--copy-share", type=float, default=0.0,
                   help="share of the synthetic tokens that are copy documents (harness/corpus.py)")
    p.add_argument("--no-finetune", action="store_true", help="skip the 64-example fine-tuning eval")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def parse_task_weights(text: str) -> dict[str, float]:
    """`"math=0.6,induction=0.1"` -> `{"math": 0.6, "induction": 0.1}`."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--task-weights: expected TASK=WEIGHT items, got {item!r}") from None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import numpy as np

    import stackops as so
    from stackops_harness import config as C
    from stackops_harness import reasoning as R
    from stackops_harness import report as Rep
    from stackops_harness.corpus import build_mixed_corpus
    from stackops_harness.metrics import read_metrics
    from stackops_harness.paths import data_root
    from stackops_harness.trainer import train

    preset = PRESETS[args.preset]
    out = args.out or Path("runs") / f"midas-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SystemExit("--methods is empty")

    # Data: stdlib text + synthetic primitives, built once and cached.
    corpus_settings = dict(preset["corpus"], copy_share=args.copy_share)
    if args.synthetic_fraction is not None:
        corpus_settings["synthetic_fraction"] = args.synthetic_fraction
    if args.task_weights is not None:
        corpus_settings["task_weights"] = parse_task_weights(args.task_weights)
    data_dir = corpus_dir(data_root(), corpus_settings)
    t0 = time.time()
    corpus_meta = build_mixed_corpus(data_dir, **corpus_settings)
    print(f"corpus {data_dir}: {corpus_meta['train_tokens']:,} train / "
          f"{corpus_meta['val_tokens']:,} val tokens, "
          f"{corpus_meta['synthetic_fraction_actual']:.1%} synthetic ({time.time() - t0:.1f}s)")

    base = dict(preset["train"])
    if args.stages is not None:
        base["stages"] = args.stages
        if base["depth"] % args.stages:
            base["depth"] = args.stages * max(1, base["depth"] // args.stages)
    if args.alpha is not None:
        base["alpha"] = args.alpha
    if args.steps is not None:
        base["total_steps"] = args.steps
    base["data_dir"] = str(data_dir)
    base["progress"] = not args.no_progress
    prim_cfg = R.PrimitiveEvalConfig(max_len=base["seq_len"], **preset["prim"])

    def make_config(method: str, seed: int) -> C.TrainConfig:
        cfg = C.TrainConfig(**dict(base, method=method, seed=seed, data_seed=seed))
        cfg = C.apply_overrides(cfg, args.set)
        if method != "baseline" and args.ablation:
            cfg = C.apply_overrides(cfg, args.ablation)
        return cfg

    def label(method: str) -> str:
        if method != "baseline" and args.ablation:
            return f"{method}[{','.join(args.ablation)}]"
        return method

    (out / "config.json").write_text(json.dumps({
        "argv": sys.argv[1:] if argv is None else argv,
        "preset": args.preset,
        "methods": methods,
        "seeds": args.seeds,
        "train": C.config_to_dict(make_config(methods[0], 0)),
        "ablation": args.ablation,
        "primitives": dataclasses.asdict(prim_cfg),
        "corpus": {"dir": str(data_dir), **corpus_meta},
    }, indent=2, default=str))

    def fewshot_hook(step: int, model: Any, record: dict[str, Any]) -> dict[str, Any]:
        acc = R.few_shot_accuracy(model, prim_cfg)
        return {f"fewshot/{t}": a for t, a in acc.items()} | {"fewshot/avg": float(np.mean(list(acc.values())))}

    results: dict[str, list[dict[str, Any]]] = {}
    for seed in range(args.seeds):
        for method in methods:
            cfg = make_config(method, seed)
            run_dir = out / f"{label(method)}-seed{seed}"
            done = run_dir / "final_eval.json"
            print(f"\n=== {label(method)} (seed {seed}) -> {run_dir}")
            if done.exists():
                print("already finished: reusing its results")
                results.setdefault(method, []).append(json.loads(done.read_text()))
                continue
            res = train(cfg, run_dir, on_eval=fewshot_hook)
            rec: dict[str, Any] = {"seed": seed, "method": method, "label": label(method)}
            t1 = time.time()
            if not args.no_finetune:
                ft = R.finetune_accuracy(res.model, prim_cfg, seed=seed)
                rec["finetune"] = ft
            rec["finetune_seconds"] = time.time() - t1
            sim = R.layer_similarity(res.model.blocks)
            np.save(run_dir / "layer_similarity.npy", sim)
            rec["layer_similarity"] = sim.tolist()
            rec["depth"] = res.depth
            rec["val_loss"] = res.val_loss
            done.write_text(json.dumps(rec, indent=2))
            results.setdefault(method, []).append(rec)

    # ---------------------------------------------------------------- the report
    curves: dict[str, list[dict[str, np.ndarray]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    task_points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for method in methods:
        for seed in range(args.seeds):
            recs = read_metrics(out / f"{label(method)}-seed{seed}" / "metrics.jsonl")
            curves.setdefault(method, []).append(Rep.eval_curve(recs))
            evals = [r for r in recs if r.get("kind") == "eval"]
            last = evals[-1]
            end = [r for r in recs if r.get("kind") == "end"]
            finals.setdefault(method, []).append({"eval": last, "end": end[-1] if end else last})
            for key in [*(f"fewshot/{t}" for t in prim_cfg.tasks), "fewshot/avg"]:
                task_points.setdefault(key.split("/")[1], {}).setdefault(method, []).extend(
                    (r["val_loss"], r[key]) for r in evals if key in r and r["step"] > 0
                )

    cfg0 = make_config(methods[0], 0)
    ideal = so.ideal_speedup(cfg0.stages, cfg0.alpha)
    by = {m: finals[m] for m in methods}

    def avg(method: str, fn) -> float:
        return float(np.mean([fn(f) for f in by[method]]))

    base_m = "baseline" if "baseline" in methods else None
    base_flops = avg(base_m, lambda f: f["eval"]["flops"]) if base_m else None
    base_secs = avg(base_m, lambda f: Rep.train_seconds(f["eval"])) if base_m else None

    def flops_to_reach(curve: dict[str, np.ndarray], target: float) -> float:
        hit = np.nonzero(curve["val_loss"] <= target)[0]
        return float(curve["flops"][hit[0]]) if hit.size else float("nan")

    tasks = prim_cfg.tasks
    header = ["method", "final val loss", "train FLOPs", "train wall s", "compile s",
              "FLOPs speedup", "wall speedup", "ideal speedup", "FLOPs to baseline loss"]
    rows = []
    prim_header = ["method"] + [f"{t} 5-shot" for t in tasks] + ["avg 5-shot"]
    prim_header += [f"{t} FT-64" for t in tasks] + ["avg FT-64"]
    prim_rows = []
    summary: dict[str, Any] = {"ideal_speedup": ideal, "methods": {}}
    for method in methods:
        loss = [f["eval"]["val_loss"] for f in by[method]]
        flops = avg(method, lambda f: f["eval"]["flops"])
        secs = avg(method, lambda f: Rep.train_seconds(f["eval"]))
        compile_s = avg(method, lambda f: f["eval"].get("time_compile", 0.0))
        fs = base_flops / flops if base_flops else float("nan")
        ws = base_secs / secs if base_secs else float("nan")
        # Paired by seed: FLOPs at which seed s of the method first reaches the final loss
        # of seed s of the baseline; averaged over the seeds that reach it.
        hits = [flops_to_reach(c, b["eval"]["val_loss"])
                for c, b in zip(curves[method], by[base_m])] if base_m else []
        reached = [h for h in hits if h == h]
        reach = float(np.mean(reached)) if reached else float("nan")
        few = {t: [f["eval"].get(f"fewshot/{t}") for f in by[method]] for t in tasks}
        few_avg = [f["eval"].get("fewshot/avg") for f in by[method]]
        fts = [r["finetune"] for r in results[method] if "finetune" in r]
        ft = {t: [x[t]["mean"] for x in fts] for t in tasks}
        ft_std = {t: [x[t]["std"] for x in fts] for t in tasks}
        ft_avg = [float(np.mean([x[t]["mean"] for t in tasks])) for x in fts]
        rows.append([label(method), Rep.mean_std(loss), f"{flops:.3g}", f"{secs:.0f}",
                     f"{compile_s:.0f}", f"{fs:.3f}", f"{ws:.3f}",
                     "1.000" if method == "baseline" else f"{ideal:.3f}",
                     (f"{reach:.3g}" + (f" ({len(reached)}/{len(hits)} seeds)"
                                        if len(reached) < len(hits) else ""))
                     if reached else "not reached"])

        def ft_cell(t: str) -> str:
            if not ft[t]:
                return "–"
            if args.seeds == 1:  # spread over the fine-tuning runs of the one seed
                return f"{ft[t][0]:.3f} ± {ft_std[t][0]:.3f}"
            return Rep.mean_std(ft[t])

        prim_rows.append([label(method)] + [Rep.mean_std(few[t]) for t in tasks]
                         + [Rep.mean_std(few_avg)] + [ft_cell(t) for t in tasks]
                         + [Rep.mean_std(ft_avg)])
        summary["methods"][label(method)] = {
            "val_loss": loss, "train_flops": flops, "train_seconds": secs,
            "compile_seconds": compile_s, "flops_speedup": fs, "wall_speedup": ws,
            "flops_to_baseline_loss": reach, "fewshot": few, "fewshot_avg": few_avg,
            "finetune_mean": ft, "finetune_std": ft_std, "finetune_avg": ft_avg,
        }
    table = Rep.markdown_table(header, rows)
    # Two floors, in the same columns: uniform chance, and an informed guess that knows the
    # answer format but not the computation (a model must beat the second to compute).
    chance = {t: R.P.chance_accuracy(t) for t in tasks}
    informed = {t: R.informed_guess_accuracy(t, prim_cfg.n_eval, prim_cfg.eval_seed) for t in tasks}
    for name, floor in (("*uniform chance*", chance), ("*informed guess*", informed)):
        cells = [f"{floor[t]:.3f}" for t in tasks]
        avg_cell = f"{np.mean(list(floor.values())):.3f}"
        prim_rows.append([name, *cells, avg_cell, *cells, avg_cell])
    summary["floors"] = {"uniform_chance": chance, "informed_guess": informed}
    prim_table = Rep.markdown_table(prim_header, prim_rows)

    plots = {}
    plots["loss"] = Rep.plot_loss_curves(curves, out / "loss_vs_flops_and_time.png",
                                         title=f"{args.preset}: validation loss")
    plots["acc"] = Rep.plot_accuracy_panels(
        task_points, out / "primitives_vs_loss.png",
        floors={**informed, "avg": float(np.mean(list(informed.values())))},
        title="5-shot accuracy against validation loss over checkpoints (seeds pooled)",
    )
    sims = {label(m): np.asarray(results[m][0]["layer_similarity"]) for m in methods}
    plots["sim"] = Rep.plot_similarity(sims, out / "layer_similarity.png")

    md = [
        f"# MIDAS at small scale: {args.preset} preset",
        "",
        f"Final model: {cfg0.depth} blocks of width {cfg0.d_model}, context {cfg0.seq_len}, "
        f"{cfg0.total_steps} steps of {cfg0.global_batch} sequences; growth methods train "
        f"{cfg0.stages} stages (Prop-{cfg0.alpha:g}: {list(so.prop_schedule(cfg0.total_steps, cfg0.stages, cfg0.alpha))}). "
        f"Seeds: {args.seeds}. Corpus: Python stdlib sources with "
        f"{corpus_meta['synthetic_fraction_actual']:.0%} of the tokens synthetic primitive "
        "examples (shares by task: " + ", ".join(
            f"{t} {w:.0%}" for t, w in corpus_meta["settings"]["task_weights"].items())
        + ").",
        "",
        "## Loss, compute and time",
        "",
        table,
        "",
        "## Reasoning primitives (exact match)",
        "",
        prim_table,
        "",
        "- *FLOPs speedup*: baseline training FLOPs / the method's (counted from the "
        "architecture, embedding and head included). *Wall speedup*: the same for training "
        "wall time (steps and growth; compilation, evaluation and checkpoints are reported or "
        "left out separately, as runs in one process share compiled steps). *Ideal*: "
        "`k·Σi^α/Σi^(α+1)`, the paper's figure when a step's cost is proportional to depth.",
        "- *FLOPs to baseline loss*: FLOPs at the first evaluation where the method's "
        "validation loss is at or below the final loss of the baseline with the same seed "
        "(mean over seeds). Wall times are means over seeds and noisy on a shared machine.",
        "- Primitives: exact match on held-out examples; 5-shot in context (prompts cut from "
        f"the left to the context of {cfg0.seq_len} bytes), and after fine-tuning on 64 "
        f"examples ({prim_cfg.ft_steps} steps, {prim_cfg.ft_runs} runs). *Informed guess*: the "
        "expected score of a guesser that knows the answer format but not the computation "
        "(a digit or item seen in the prompt; for math the most frequent result).",
        "",
        "![loss](loss_vs_flops_and_time.png)",
        "",
        "![primitives vs loss](primitives_vs_loss.png)",
        "",
        "![layer similarity](layer_similarity.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n" + table + "\n\n" + prim_table)
    print(f"\nreport: {out / 'report.md'}")
    return summary


def entry() -> int:
    """The `stackops-midas` console script (and `python experiments/midas.py`): run `main` on the
    command line's arguments and return the exit status."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
