"""Evaluate the reasoning primitives on a checkpoint: k-shot in context and fine-tuned on 64.

    python experiments/eval_primitives.py runs/midas-default/midas-seed0
    python experiments/eval_primitives.py RUN_DIR --step 900 --tasks math,varassign_d0 --no-finetune

Teacher-forced exact match (and a greedy check) with complete shots, next to each task's
floor. Prints a table and writes `primitives-stepN.json` into the run directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stackops_harness import require_extras


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--shots", type=int, default=None,
                   help="shots per prompt (default: per task, the most that fit, up to 5)")
    p.add_argument("--ft-steps", type=int, default=40)
    p.add_argument("--ft-runs", type=int, default=3)
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from stackops_harness import primitives as P
    from stackops_harness import reasoning as R
    from stackops_harness.checkpoint import load_checkpoint
    from stackops_harness.report import markdown_table

    model, config, manifest = load_checkpoint(args.run_dir, args.step)
    tasks = tuple(args.tasks.split(",")) if args.tasks else P.TASKS
    try:
        cfg = R.PrimitiveEvalConfig(
            tasks=tasks, n_eval=args.n_eval, shots=args.shots, max_len=config.seq_len,
            ft_steps=args.ft_steps, ft_runs=args.ft_runs,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    suite = R.PrimitiveSuite(cfg)
    tf = suite.accuracy(model)
    greedy = suite.greedy(model)
    ft = {} if args.no_finetune else R.finetune_accuracy(model, cfg, seed=args.seed)
    rows = []
    for t in tasks:
        ft_cell = f"{ft[t]['mean']:.3f} ± {ft[t]['std']:.3f}" if t in ft else "–"
        rows.append([t, suite.shots[t], f"{tf[t]:.3f}", f"{greedy[t]:.3f}", ft_cell,
                     f"{suite.floors[t]['floor']:.3f}"])
    print(f"{args.run_dir} step {manifest['step']} (depth {model.depth}, "
          f"method {config.method})")
    print(markdown_table(["task", "shots", "teacher-forced", f"greedy ({cfg.greedy_n})",
                          f"FT-{cfg.ft_examples}", "floor"], rows))
    out = {"step": manifest["step"], "teacher_forced": tf, "greedy": greedy, "finetune": ft,
           "floors": suite.floors, "shots": suite.shots,
           "config": vars(args) | {"run_dir": str(args.run_dir)}}
    path = args.run_dir / f"primitives-step{manifest['step']}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    return out


def entry() -> int:
    """Console script `stackops-eval-primitives` (also `python experiments/eval_primitives.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-eval-primitives")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
