"""Benchmark: the primitive evaluation's share of a default-preset seed, measured side by side.

    python experiments/bench_eval.py              # default preset model, 500 prompts per task
    python experiments/bench_eval.py --steps 20 --n-eval 300

Times, in turns on the same machine, the default preset's training step (the final depth,
the baseline's: the most expensive stage) and one teacher-forced evaluation of the default
tasks, plus the greedy check, then projects the evaluation's share of a whole run
(`--tf-evals` teacher-forced evaluations and one greedy check over the preset's steps).
Growth methods train cheaper steps, so their share is higher: the projection also gives
it at the growth schedule's mean step cost.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--tf-evals", type=int, default=3)
    args = p.parse_args(argv)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import stackops as so
    from stackops_harness import reasoning as R
    from stackops_harness.cli.midas import EVAL_TASKS, PRESETS
    from stackops_harness.config import TrainConfig
    from stackops_harness.evaluate import next_token_loss
    from stackops_harness.sharding import make_mesh
    from stackops_harness.state import build_model, make_optimizer, run_attention

    cfg = TrainConfig(**dict(PRESETS["default"]["train"], method="baseline", progress=False))
    optimizer, _ = make_optimizer(cfg)
    model = build_model(cfg, jax.random.key(0), cfg.depth)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    attn_name, attention = run_attention(cfg, make_mesh())  # what a training run uses

    @jax.jit
    def step(p, o, tokens):
        g = jax.grad(lambda q: next_token_loss(eqx.combine(q, static), tokens,
                                               attention=attention))(p)
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o

    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, 256, (cfg.global_batch, cfg.seq_len + 1)), jnp.int32)
    params, opt_state = step(params, opt_state, tokens)  # compile
    suite = R.PrimitiveSuite(R.PrimitiveEvalConfig(tasks=EVAL_TASKS, n_eval=args.n_eval,
                                                   max_len=cfg.seq_len), attention=attention)
    suite.accuracy(model)  # compile the evaluation's shapes
    suite.greedy(model, n=4)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state = step(params, opt_state, tokens)
    jax.block_until_ready(params)
    step_s = (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    suite.accuracy(eqx.combine(params, static))
    tf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    suite.greedy(eqx.combine(params, static))
    greedy_s = time.perf_counter() - t0
    lengths = so.prop_schedule(cfg.total_steps, cfg.stages, cfg.alpha)
    mean_cost = sum(n * (i + 1) / cfg.stages for i, n in enumerate(lengths)) / cfg.total_steps
    eval_s = args.tf_evals * tf_s + greedy_s
    base_train = cfg.total_steps * step_s
    grow_train = base_train * mean_cost
    out = {"step_seconds": step_s, "tf_eval_seconds": tf_s, "greedy_seconds": greedy_s,
           "share_baseline": eval_s / (eval_s + base_train),
           "share_growth": eval_s / (eval_s + grow_train)}
    print(f"attention core: {attn_name} (training and evaluation)")
    print(f"default preset, final depth {cfg.depth}: train step {step_s * 1e3:.0f} ms; one "
          f"teacher-forced evaluation ({len(EVAL_TASKS)} tasks x {args.n_eval} prompts) "
          f"{tf_s:.1f} s; greedy check ({suite.cfg.greedy_n} prompts per task) {greedy_s:.1f} s")
    print(f"projected evaluation share of a run ({args.tf_evals} evaluations + greedy over "
          f"{cfg.total_steps} steps): baseline {out['share_baseline']:.1%}, growth methods "
          f"{out['share_growth']:.1%} (their mean step costs {mean_cost:.2f} of the "
          "baseline's; FLOP-proportional, the real share a little lower)")
    return out


def entry() -> int:
    """The `python experiments/bench_eval.py` program."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
