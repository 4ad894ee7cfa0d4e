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
end. Finished runs are reused, so an interrupted comparison resumes where it stopped
(run more seeds later with a larger `--seeds`, or one sitting's seeds with `--seed-list`).

The primitives are scored by teacher-forced exact match on the last `--tf-evals`
evaluations (`stackops_harness.reasoning.PrimitiveSuite`), with a greedy-generation check at
the end; `report.md` gives per claim *supported* / *contradicted* / *not established* with
the paired numbers behind it (`stackops_harness.claims`). Every argument is checked before
any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from stackops_harness import presets as _presets
from stackops_harness import require_extras
from stackops_harness.corpus import corpus_dir
from stackops_harness.paths import data_root

EVAL_TASKS = _presets.EVAL_TASKS
PRESETS: dict[str, dict[str, Any]] = _presets.MIDAS_PRESETS  # stackops_harness.presets

METHODS = ("baseline", "gradstack", "midas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/midas-PRESET)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    p.add_argument("--seeds", type=int, default=1, help="repeat every method with seeds 0..N-1")
    p.add_argument("--seed-list", default=None, metavar="S,S,...",
                   help="train only these seeds now (the report covers every finished seed "
                   "below --seeds)")
    p.add_argument("--tf-evals", type=int, default=3,
                   help="score the primitives at the last N evaluations (averaged; fitted "
                   "against validation loss for claim 3)")
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
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune each final model on 64 examples per task (slow)")
    p.add_argument("--no-finetune", action="store_true", help=argparse.SUPPRESS)
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


@dataclasses.dataclass
class Plan:
    """Everything `main` will run, checked before any training."""

    args: argparse.Namespace
    out: Path
    methods: list[str]
    seeds: list[int]
    corpus: dict[str, Any]
    base: dict[str, Any]
    prim: Any
    configs: dict[tuple[str, int], Any]

    def label(self, method: str) -> str:
        if method != "baseline" and self.args.ablation:
            return f"{method}[{','.join(self.args.ablation)}]"
        return method


def plan(args: argparse.Namespace) -> Plan:
    """Check every argument and build every run's config; a one-line `SystemExit` on the
    first problem, before any data is built or any step is trained."""
    from stackops_harness import config as C
    from stackops_harness import reasoning as R
    from stackops_harness.corpus import _settings
    from stackops_harness.methods import check_method_name

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SystemExit("--methods is empty; give e.g. --methods baseline,gradstack,midas")
    for m in methods:
        if m == "custom":
            raise SystemExit("--methods: 'custom' needs an operator object; use "
                             "stackops_harness.trainer.train from Python instead")
        try:
            check_method_name(m)
        except ValueError as e:
            raise SystemExit(f"--methods: {e}".replace("TrainConfig.method: ", "")) from None
    if len(set(methods)) != len(methods):
        raise SystemExit(f"--methods lists a method twice: {args.methods}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    seeds = list(range(args.seeds))
    if args.seed_list is not None:
        try:
            seeds = sorted({int(x) for x in args.seed_list.split(",") if x.strip()})
        except ValueError:
            raise SystemExit(f"--seed-list: expected integers, got {args.seed_list!r}") from None
        if not seeds or min(seeds) < 0 or max(seeds) >= args.seeds:
            raise SystemExit(f"--seed-list must name seeds in 0..{args.seeds - 1} "
                             f"(--seeds {args.seeds}), got {args.seed_list!r}")
    if args.tf_evals < 1:
        raise SystemExit(f"--tf-evals must be >= 1, got {args.tf_evals}")
    preset = PRESETS[args.preset]
    corpus = dict(preset["corpus"], copy_share=args.copy_share)
    if args.synthetic_fraction is not None:
        corpus["synthetic_fraction"] = args.synthetic_fraction
    if args.task_weights is not None:
        corpus["task_weights"] = parse_task_weights(args.task_weights)
    try:
        _settings(corpus["synthetic_fraction"], corpus["copy_share"], corpus["task_weights"],
                  corpus["max_mb"], 0.05, 0)
    except ValueError as e:
        raise SystemExit(f"corpus settings: {e}") from None
    base = dict(preset["train"])
    if args.stages is not None:
        if args.stages < 1:
            raise SystemExit(f"--stages must be >= 1, got {args.stages}")
        base["stages"] = args.stages
        if base["depth"] % args.stages:
            base["depth"] = args.stages * max(1, base["depth"] // args.stages)
    if args.alpha is not None:
        base["alpha"] = args.alpha
    if args.steps is not None:
        base["total_steps"] = args.steps
    base["progress"] = not args.no_progress
    configs = {}
    for method in methods:
        for seed in seeds:
            try:
                cfg = C.TrainConfig(**dict(base, method=method, seed=seed, data_seed=seed))
                cfg = C.apply_overrides(cfg, args.set)
                if method != "baseline" and args.ablation:
                    cfg = C.apply_overrides(cfg, args.ablation)
                check_method_name(cfg.method)  # an override may name another method
            except (ValueError, TypeError) as e:
                where = "--ablation" if args.ablation and method != "baseline" else "--set"
                raise SystemExit(f"{method}: {e} (check --steps/--stages/--alpha and {where})"
                                 .replace("\n", " ")) from None
            configs[method, seed] = cfg
    try:
        prim = R.PrimitiveEvalConfig(**dict(dict(max_len=base["seq_len"]), **preset["prim"]))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = args.out or Path("runs") / f"midas-{args.preset}"
    return Plan(args, out, methods, seeds, corpus, base, prim, configs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every method and seed of the plan (reusing finished runs), then report."""
    args = parse_args(argv)
    p = plan(args)
    from stackops_harness import report as Rep
    from stackops_harness.corpus import build_mixed_corpus

    p.out.mkdir(parents=True, exist_ok=True)
    data_dir = corpus_dir(data_root(), p.corpus)
    t0 = time.time()
    meta = build_mixed_corpus(data_dir, **p.corpus)
    print(f"corpus {data_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
          f"tokens, {meta['synthetic_fraction_actual']:.1%} synthetic ({time.time() - t0:.1f}s)")
    for cfg_key in list(p.configs):
        p.configs[cfg_key] = p.configs[cfg_key].replace(data_dir=str(data_dir))
    write_config(p, meta, argv)
    suite = train_all(p)
    summary, md = Rep.midas_report(p.out, p.methods, p.label, args.seeds, p.configs, suite,
                                   meta, preset=args.preset, tf_evals=args.tf_evals)
    print("\n".join(md[:8]))
    print(f"\nreport: {p.out / 'report.md'}")
    return summary


def write_config(p: Plan, meta: dict[str, Any], argv: list[str] | None) -> None:
    from stackops_harness import config as C

    first = p.configs[p.methods[0], p.seeds[0]]
    (p.out / "config.json").write_text(json.dumps({
        "argv": sys.argv[1:] if argv is None else argv, "preset": p.args.preset,
        "methods": p.methods, "seeds": p.args.seeds, "trained_seeds": p.seeds,
        "train": C.config_to_dict(first), "ablation": p.args.ablation,
        "primitives": dataclasses.asdict(p.prim), "tf_evals": p.args.tf_evals,
        "corpus": {"dir": first.data_dir, **meta},
    }, indent=2, default=str))


def train_all(p: Plan) -> Any:
    """Train the plan's runs that are not finished; returns the primitive suite."""
    import numpy as np

    from stackops_harness import reasoning as R
    from stackops_harness.sharding import make_mesh
    from stackops_harness.state import run_attention
    from stackops_harness.trainer import train

    # Evaluate with the training runs' attention core (the CPU kernel where it builds).
    _, attention = run_attention(p.configs[p.methods[0], p.seeds[0]], make_mesh())
    suite = R.PrimitiveSuite(p.prim, attention=attention)
    for seed in p.seeds:
        for method in p.methods:
            cfg = p.configs[method, seed]
            run_dir = p.out / f"{p.label(method)}-seed{seed}"
            done = run_dir / "final_eval.json"
            print(f"\n=== {p.label(method)} (seed {seed}) -> {run_dir}")
            if done.exists():
                print("already finished: reusing its results")
                continue
            first_tf = cfg.total_steps - (p.args.tf_evals - 1) * cfg.eval_every
            spent = {"s": 0.0}

            def hook(step: int, model: Any, record: dict[str, Any], first_tf=first_tf,
                     total=cfg.total_steps, spent=spent) -> dict[str, Any]:
                if step < max(first_tf, 1):
                    return {}
                t0 = time.time()
                rec = {f"tf/{t}": a for t, a in suite.accuracy(model).items()}
                if step >= total:
                    rec |= {f"greedy/{t}": a for t, a in suite.greedy(model).items()}
                spent["s"] += time.time() - t0
                return rec | {"primitive_seconds": time.time() - t0}

            res = train(cfg, run_dir, on_eval=hook)
            rec: dict[str, Any] = {"seed": seed, "method": method, "label": p.label(method),
                                   "depth": res.depth, "val_loss": res.val_loss,
                                   "primitive_seconds": spent["s"]}
            if p.args.finetune:
                t1 = time.time()
                rec["finetune"] = R.finetune_accuracy(res.model, p.prim, seed=seed)
                rec["finetune_seconds"] = time.time() - t1
            sim = R.layer_similarity(res.model.blocks)
            np.save(run_dir / "layer_similarity.npy", sim)
            rec["layer_similarity"] = sim.tolist()
            done.write_text(json.dumps(rec, indent=2))
    return suite


def entry() -> int:
    """Console script `stackops-midas` (also `python experiments/midas.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-midas")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
