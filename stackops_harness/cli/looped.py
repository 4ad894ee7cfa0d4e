"""A looped model `(k ⊗ L)` against iso-parameter and iso-FLOP untied baselines.

    python experiments/looped.py --preset smoke      # under a minute
    python experiments/looped.py                     # default: (2 ⊗ 3) vs 2 and 6 untied layers
    python experiments/looped.py --k 3 --loops 4 --out runs/looped-3x4
    python experiments/looped.py --seeds 3 --looped-lr 0.006   # paired over 3 seeds
    python experiments/looped.py --models looped --looped-lr 0.001 --no-finetune  # LR sweep

Three models train on the same data, seed and step budget:

- `looped (k⊗L)`: `k` distinct layers run `L` times with shared weights
  (`stackops.loop_tie(block=k, repeats=L)`), effective depth `k·L`;
- `iso-param`: `k` untied layers (the same parameters, `1/L` of the FLOPs);
- `iso-FLOP`: `k·L` untied layers (the same FLOPs, `L×` the block parameters).

The looped model is built by the harness as an `L`-stage run with `loop_tie(block=k)` at
every boundary (each adds one more pass through the same `k` layers) and Prop-α with a
large α, so the first `L - 1` stages last one step each and the full loop trains for the
rest of the budget. Reports validation loss, FLOPs, the reasoning
primitives (k-shot and fine-tuned) and writes `report.md` in the output folder; with
`--seeds N` every model trains with seeds `0..N-1` and the report compares the looped model
with each untied one paired by seed (mean difference, 95% CI, p-value, verdict). Finished
runs are reused, so more seeds can be added later. `--looped-lr` gives the looped model its
own peak learning rate (its run directories are then tagged with it), since weight sharing
changes the effective step size of the shared layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from stackops_harness import require_extras
from stackops_harness.corpus import corpus_dir
from stackops_harness.presets import LOOPED_PRESETS

PRESETS: dict[str, dict[str, Any]] = LOOPED_PRESETS  # stackops_harness.presets


MODELS = ("looped", "iso-param", "iso-flop")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--k", type=int, default=2, help="distinct layers in the loop")
    p.add_argument("--loops", type=int, default=3, help="times the k layers run (L)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every model with seeds 0..N-1 (init and data order)")
    p.add_argument("--looped-lr", type=float, default=None,
                   help="peak learning rate of the looped model only (default: the preset's, "
                   "as the untied models); choose it with a sweep: --models looped --seeds 1")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the untied models (default: the preset's); "
                   "their run directories are then tagged with it")
    p.add_argument("--model-lr", action="append", default=[], metavar="MODEL=LR",
                   help="peak learning rate of one model (repeatable; overrides --lr and "
                   "--looped-lr for it), e.g. --model-lr iso-flop=0.006")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of synthetic documents in the pretraining tokens (default: preset)")
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.k < 1 or args.loops < 2:
        raise SystemExit("--k must be >= 1 and --loops >= 2")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    for flag, value in (("--looped-lr", args.looped_lr), ("--lr", args.lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SystemExit(f"{flag} must be a positive finite number, got {value}")
    model_lr: dict[str, float] = {}
    for item in args.model_lr:
        name, _, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if name.strip() not in MODELS or not (math.isfinite(value) and value > 0):
            raise SystemExit(f"--model-lr: expected MODEL=LR with MODEL in {','.join(MODELS)} "
                             f"and a positive LR, got {item!r}")
        model_lr[name.strip()] = value
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown or args.models!r}; choose from "
                         f"{','.join(MODELS)}")

    import numpy as np

    import stackops as so
    from stackops_harness import config as C
    from stackops_harness import reasoning as R
    from stackops_harness import report as Rep
    from stackops_harness import stats as S
    from stackops_harness.corpus import build_mixed_corpus
    from stackops_harness.metrics import read_metrics
    from stackops_harness.paths import data_root
    from stackops_harness.trainer import train

    preset = PRESETS[args.preset]
    k, L = args.k, args.loops
    lr = args.lr if args.lr is not None else preset["train"].get("lr", C.TrainConfig().lr)
    given_lr = {"looped": args.looped_lr, "iso-param": args.lr, "iso-flop": args.lr} | model_lr
    lrs = {m: v if v is not None else lr for m, v in given_lr.items()}
    names = {"looped": f"looped ({k}⊗{L})", "iso-param": f"iso-param ({k} layers)",
             "iso-flop": f"iso-FLOP ({k * L} layers)"}

    def config(model: str, seed: int, data_dir: str) -> Any:
        common = dict(preset["train"], data_dir=data_dir, progress=not args.no_progress,
                      seed=seed, data_seed=seed)
        if model == "looped":
            return C.TrainConfig(**dict(common, method="custom", depth=k * L, stages=L,
                                        alpha=30.0, lr=lrs["looped"]))
        depth = k if model == "iso-param" else k * L
        return C.TrainConfig(**dict(common, method="baseline", depth=depth, stages=1,
                                    lr=lrs[model]))

    # Every argument is checked (configs built) before the corpus or any training.
    for m in models:
        config(m, 0, "")
    out = args.out or Path("runs") / f"looped-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    corpus = dict(preset["corpus"])
    if args.synthetic_fraction is not None:
        corpus["synthetic_fraction"] = args.synthetic_fraction
    data_dir = corpus_dir(data_root(), corpus)
    build_mixed_corpus(data_dir, **corpus)
    prim_cfg = R.PrimitiveEvalConfig(max_len=preset["train"]["seq_len"], **preset["prim"])
    suite = R.PrimitiveSuite(prim_cfg)
    seeds = list(range(args.seeds))

    def run_dir(model: str, seed: int) -> Path:
        given = given_lr[model]
        tag = "" if given is None else f"-lr{given:g}"
        return out / f"{model}{tag}-seed{seed}"

    (out / "config.json").write_text(json.dumps(
        {"argv": argv if argv is not None else sys.argv[1:], "seeds": args.seeds,
         "runs": {names[m]: C.config_to_dict(config(m, 0, str(data_dir))) for m in models},
         "op": repr(so.loop_tie(block=k, repeats=L)),
         "primitives": dataclasses.asdict(prim_cfg)}, indent=2, default=str))

    per: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in models}
    sims: dict[str, Any] = {}
    for seed in seeds:
        for m in models:
            rd = run_dir(m, seed)
            print(f"\n=== {names[m]} (seed {seed}) -> {rd}")
            op = so.loop_tie(block=k) if m == "looped" else None
            res = train(config(m, seed, str(data_dir)), rd, op=op)
            few = suite.accuracy(res.model)
            ft = {} if args.no_finetune else R.finetune_accuracy(res.model, prim_cfg)
            last = [r for r in read_metrics(res.metrics_path) if r.get("kind") == "eval"][-1]
            blocks = res.model.blocks
            n_params = sum(x.size for x in __import__("jax").tree.leaves(blocks.layers))
            if seed == 0:
                sims[names[m]] = R.layer_similarity(blocks)
            per[m][seed] = {"val_loss": last["val_loss"], "flops": last["flops"],
                            "block_params": int(n_params), "positions": len(blocks),
                            "stored_layers": blocks.num_layers, "fewshot": few, "finetune": ft,
                            "kshot_avg": float(np.mean(list(few.values())))}
            (rd / "final_eval.json").write_text(json.dumps(per[m][seed], indent=2,
                                                           default=float))

    def ms(m: str, key: Any) -> str:
        vals = [key(r) for r in per[m].values()]
        mean, sd = S.mean_sd(vals)
        return f"{mean:.3f}" if len(vals) < 2 else f"{mean:.3f} ± {sd:.3f}"

    rows = []
    for m in models:
        r0 = per[m][0]
        rows.append([names[m], r0["positions"], r0["stored_layers"], f"{r0['block_params']:,}",
                     f"{lrs[m]:g}",
                     ms(m, lambda r: r["val_loss"]), f"{r0['flops']:.3g}",
                     ms(m, lambda r: r["kshot_avg"])]
                    + [ms(m, lambda r, t=t: r["fewshot"][t]) for t in prim_cfg.tasks])
    header = ["model", "positions", "stored layers", "block params", "peak LR",
              "val loss", "FLOPs", "avg k-shot"] + [f"{t} (k-shot)" for t in prim_cfg.tasks]
    table = Rep.markdown_table(header, rows)
    comparisons: dict[str, Any] = {}
    lines = []
    if "looped" in models and len(seeds) >= 2:
        for other in [m for m in models if m != "looped"]:
            for metric, key, claim in (
                    ("val loss", lambda r: r["val_loss"], "a < b"),
                    ("avg k-shot", lambda r: r["kshot_avg"], "a > b"),
                    ("math k-shot", lambda r: r["fewshot"].get("math", float("nan")), "a > b")):
                res_p = S.paired({s: key(r) for s, r in per["looped"].items()},
                                 {s: key(r) for s, r in per[other].items()})
                v = S.verdict(res_p, claim=claim)
                comparisons[f"looped - {other}: {metric}"] = {
                    "mean": res_p.mean, "ci": list(res_p.ci), "p": res_p.p, "sd": res_p.sd,
                    "n": res_p.n, "claim": claim, "verdict": v}
                lines.append(f"- looped − {other}, {metric}: {res_p.summary()} — claim "
                             f"`looped {claim[2]} {other}`: **{v}**")
    Rep.plot_similarity(sims, out / "layer_similarity.png")
    n_seeds = len(seeds)
    stats_text = (["Paired by seed (95% t-intervals, SD with ddof=1):", "", *lines, ""]
                  if lines else [f"{n_seeds} seed(s): differences are not established "
                                 "without at least two paired seeds.", ""])
    (out / "report.md").write_text("\n".join([
        f"# Looped ({k}⊗{L}) vs untied baselines ({args.preset} preset, {n_seeds} seed(s))",
        "", table, "",
        "Mean ± sample SD (ddof=1) over seeds; FLOPs and sizes of seed 0. Teacher-forced "
        "exact match with complete shots ("
        + ", ".join(f"{t} {n}-shot" for t, n in suite.shots.items()) + "). Floors (the "
        "highest of uniform chance, informed guess and structural shortcut): "
        + ", ".join(f"{t} {f['floor']:.3f}" for t, f in suite.floors.items()) + ".", "",
        *stats_text,
        "![layer similarity](layer_similarity.png)", ""]))
    summary = {"runs": {names[m]: {str(s): r for s, r in per[m].items()} for m in models},
               "comparisons": comparisons, "lr": lr, "looped_lr": lrs["looped"],
               "model_lr": lrs}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n" + table + "\n" + "\n".join(lines))
    return summary


def entry() -> int:
    """Console script `stackops-looped` (also `python experiments/looped.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-looped")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
