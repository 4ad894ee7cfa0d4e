"""Pilot runs that choose the pretraining mix: can the default preset's baseline learn a primitive?

    python experiments/pilot_primitives.py --name mixA --task-weights math=0.3,recall=0.2,...
    python experiments/pilot_primitives.py --name d0-heavy --steps 1500 --n-eval 300

One baseline run of the default preset's model (or a shorter one with `--steps`) on a mixed
corpus, scored by teacher-forced exact match at a few steps against each task's floor
(`stackops_harness.primitives.floors`). Writes `OUT/NAME.json` (the settings, the corpus
metadata and the scores) so the choice of the mix is on record.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("results/pilots"))
    p.add_argument("--task-weights", default=None, metavar="TASK=W,...")
    p.add_argument("--synthetic-fraction", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=None, help="default: the default preset's")
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--evals", type=int, default=3, help="evaluations, evenly spaced")
    p.add_argument("--max-mb", type=float, default=20.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from stackops_harness import config as C
    from stackops_harness import reasoning as R
    from stackops_harness.cli.midas import PRESETS, parse_task_weights
    from stackops_harness.corpus import MIX, build_mixed_corpus, corpus_dir
    from stackops_harness.methods import check_method_name
    from stackops_harness.paths import data_root
    from stackops_harness.trainer import train

    weights = (parse_task_weights(args.task_weights) if args.task_weights
               else MIX["task_weights"])
    settings = dict(synthetic_fraction=args.synthetic_fraction, task_weights=weights,
                    max_mb=args.max_mb)
    data_dir = corpus_dir(data_root(), settings)
    meta = build_mixed_corpus(data_dir, **settings)
    train_cfg = dict(PRESETS["default"]["train"], method="baseline", stages=1,
                     data_dir=str(data_dir), progress=False, seed=0, data_seed=0)
    if args.steps:
        train_cfg["total_steps"] = args.steps
    steps = train_cfg["total_steps"]
    train_cfg["eval_every"] = steps // args.evals
    cfg = C.apply_overrides(C.TrainConfig(**train_cfg), args.set)
    check_method_name(cfg.method)  # before any training
    suite = R.PrimitiveSuite(R.PrimitiveEvalConfig(n_eval=args.n_eval, max_len=cfg.seq_len))
    points: list[dict[str, Any]] = []

    def hook(step: int, model: Any, record: dict[str, Any]) -> dict[str, Any]:
        if step == 0:
            return {}
        t0 = time.time()
        acc = suite.accuracy(model)
        points.append({"step": step, "val_loss": record["val_loss"], "tf": acc,
                       "eval_seconds": time.time() - t0})
        print(step, record["val_loss"], {t: round(a, 3) for t, a in acc.items()}, flush=True)
        return {f"tf/{t}": a for t, a in acc.items()}

    run_dir = Path("runs") / "pilots" / args.name
    t0 = time.time()
    res = train(cfg, run_dir, on_eval=hook)
    greedy = suite.greedy(res.model)
    out = {
        "name": args.name, "argv": argv, "train": C.config_to_dict(cfg),
        "corpus": meta, "shots": suite.shots, "floors": suite.floors, "n_eval": args.n_eval,
        "points": points, "greedy_final": greedy, "wall_seconds": time.time() - t0,
        "note": "CPU shared by several processes; wall times are noisy",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def entry() -> int:
    """The `python experiments/pilot_primitives.py` program."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
