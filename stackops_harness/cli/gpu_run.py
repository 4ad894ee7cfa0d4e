"""The prepared accelerator run: many seeds of baseline, GradStack and MIDAS; the gpu preset's MFU.

    python experiments/gpu_run.py --out results/gpu-run          # one H200, ~8 minutes
    python experiments/gpu_run.py --tiny --out /tmp/gpu-run      # the same on CPU, tiny sizes

One command, for a machine with JAX (+ CUDA), Equinox and optax but no grain and no
network:

1. builds the pretraining corpus in memory with NumPy from the standard library's sources
   there (`stackops_harness.corpus.mixed_corpus_tokens`; the stdlib differs between Python
   versions, so the text differs from a CPU run's);
2. trains `--seeds` seeds of each method at the default preset's model for `--steps` steps
   as one vmapped program per method (`stackops_harness.ensemble`), scoring the primitives
   by teacher-forced exact match on the last three evaluations, with a greedy check of
   member 0 at the end;
3. times the gpu preset's train step (bf16, one model) and reports its MFU against
   `--peak-tflops` (989 dense bf16 TFLOP/s for an H200, the vendor's figure, not measured);
4. writes `results.json`, `report.md` (the claims' verdicts, `stackops_harness.claims`),
   `mfu.json` and `timings.json` to `--out`.

Nothing on this path imports grain or orbax.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

H200_PEAK_TFLOPS = 989.0
"""NVIDIA's dense bf16 figure for the H200 SXM (no sparsity), in TFLOP/s."""

SCIENCE = dict(d_model=64, n_heads=4, depth=6, stages=6, seq_len=128, global_batch=16,
               warmup_steps=400, lr=3e-3, eval_every=1000, eval_batches=8, ckpt_every=0,
               log_every=1000, progress=False)
"""The default preset's model and optimizer (`stackops_harness.cli.midas`), with the
warmup and evaluation spacing scaled to 10k steps."""

TINY = dict(d_model=16, n_heads=2, depth=3, stages=3, seq_len=64, global_batch=2,
            warmup_steps=2, lr=3e-3, eval_every=10, eval_batches=1, ckpt_every=0,
            log_every=10, progress=False)

MFU = dict(d_model=640, n_heads=10, depth=24, stages=1, seq_len=512, global_batch=64,
           warmup_steps=10, lr=1e-3, compute_dtype="bfloat16", method="baseline",
           ckpt_every=0, progress=False)
"""The gpu preset's model (`stackops_harness.cli.midas`), one stage, bf16."""

MFU_TINY = dict(MFU, d_model=32, n_heads=2, depth=2, seq_len=32, global_batch=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU test")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 32)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 10000)")
    p.add_argument("--methods", default="baseline,gradstack,midas")
    p.add_argument("--n-eval", type=int, default=None, help="prompts per task (default 500)")
    p.add_argument("--max-mb", type=float, default=None, help="stdlib text read (default 8)")
    p.add_argument("--mfu-steps", type=int, default=None, help="timed gpu-preset steps (20)")
    p.add_argument("--peak-tflops", type=float, default=H200_PEAK_TFLOPS)
    p.add_argument("--skip-mfu", action="store_true")
    args = p.parse_args(argv)
    d = dict(seeds=2, steps=30, n_eval=16, max_mb=0.3, mfu_steps=2) if args.tiny else dict(
        seeds=32, steps=10_000, n_eval=500, max_mb=8.0, mfu_steps=20)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("seeds", "steps", "n_eval", "mfu_steps"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    return args


def _configs(args: argparse.Namespace) -> dict[str, Any]:
    from stackops_harness.config import TrainConfig
    from stackops_harness.methods import check_method_name

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SystemExit("--methods is empty")
    base = dict(TINY if args.tiny else SCIENCE, total_steps=args.steps)
    out = {}
    for m in methods:
        try:
            check_method_name(m)
            out[m] = TrainConfig(**dict(base, method=m))
        except ValueError as e:
            raise SystemExit(f"--methods {m}: {e}") from None
    return out


def _per_seed_records(history: list[dict[str, Any]], i: int, tasks: list[str]) -> list[dict]:
    recs = []
    for r in history:
        rec = {k: v for k, v in r.items() if not isinstance(v, list)}
        rec["val_loss"] = r["val_loss"][i]
        for t in tasks:
            if f"tf/{t}" in r:
                rec[f"tf/{t}"] = r[f"tf/{t}"][i]
            if i == 0 and f"greedy/{t}" in r:
                rec[f"greedy/{t}"] = r[f"greedy/{t}"]
        rec["time_total"] = sum(v for k, v in r.items() if k.startswith("time_"))
        recs.append(rec)
    return recs


def train_method(cfg: Any, seeds: list[int], train_ids: Any, val_ids: Any, suite: Any,
                 tf_from: int) -> tuple[Any, float]:
    """Train one method's seeds as an ensemble; returns the result and the primitive time."""
    import jax.numpy as jnp

    from stackops_harness import ensemble as E
    from stackops_harness import reasoning as R

    spent = {"s": 0.0}

    def hook(step: int, params: Any, static: Any, rec: dict[str, Any]) -> dict[str, Any]:
        if step < tf_from:
            return {}
        t0 = time.perf_counter()
        logits = E.ensemble_logits(static)
        acc = suite.accuracy(lambda tokens: logits(params, jnp.asarray(tokens)))
        out: dict[str, Any] = {f"tf/{t}": [float(x) for x in a] for t, a in acc.items()}
        if step >= cfg.total_steps:  # generation check on member 0
            out |= {f"greedy/{t}": a for t, a in suite.greedy(
                E.seed_model(params, static, 0)).items()}
        spent["s"] += time.perf_counter() - t0
        return out | {"primitive_seconds": time.perf_counter() - t0}

    batches = E.RandomWindows(train_ids, seq_len=cfg.seq_len, batch=cfg.global_batch,
                              seeds=[10_000 + s for s in seeds])
    val = E.fixed_windows(val_ids, seq_len=cfg.seq_len, batch=min(32, cfg.global_batch * 2),
                          num_batches=cfg.eval_batches)
    res = E.train_ensemble(cfg, seeds, batches, val, on_eval=hook,
                           log=lambda s: print(f"  {cfg.method}: {s}", flush=True))
    del R
    return res, spent["s"]


def measure_mfu(args: argparse.Namespace) -> dict[str, Any]:
    """Time the gpu preset's bf16 train step on one model; MFU against the stated peak."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from stackops.models import flops_per_token
    from stackops_harness.config import TrainConfig
    from stackops_harness.evaluate import next_token_loss
    from stackops_harness.state import build_model, lm_config, make_optimizer

    cfg = TrainConfig(**dict(MFU_TINY if args.tiny else MFU, total_steps=args.mfu_steps + 10))
    optimizer, _ = make_optimizer(cfg)
    params, static = eqx.partition(build_model(cfg, jax.random.key(0), cfg.depth), eqx.is_array)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(p, o, tokens):
        loss, g = jax.value_and_grad(lambda q: next_token_loss(
            eqx.combine(q, static), tokens, compute_dtype="bfloat16"))(p)
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, 256, (cfg.global_batch, cfg.seq_len + 1)), jnp.int32)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        params, opt_state, loss = step(params, opt_state, tokens)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(args.mfu_steps):
        params, opt_state, loss = step(params, opt_state, tokens)
    jax.block_until_ready(loss)
    secs = (time.perf_counter() - t0) / args.mfu_steps
    fpt = flops_per_token(lm_config(cfg, cfg.depth), cfg.depth, cfg.seq_len)
    flops = fpt * cfg.global_batch * cfg.seq_len
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {
        "config": {k: getattr(cfg, k) for k in ("d_model", "n_heads", "depth", "seq_len",
                                                 "global_batch", "compute_dtype")},
        "params": int(n_params), "step_seconds": secs, "compile_seconds": compile_s,
        "flops_per_step": flops, "achieved_tflops": flops / secs / 1e12,
        "peak_tflops": args.peak_tflops,
        "peak_source": "stated (NVIDIA H200 dense bf16 spec), not measured",
        "mfu": flops / secs / 1e12 / args.peak_tflops,
        "device": str(jax.devices()[0]), "final_loss": float(loss),
        "flops_counted": "stackops.models.flops_per_token (3x forward; embedding and head "
                         "included; full T x T attention)",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    configs = _configs(args)
    import jax
    import numpy as np

    import stackops as so
    from stackops_harness import claims as Cl
    from stackops_harness import primitives as P
    from stackops_harness import reasoning as R
    from stackops_harness.cli.midas import EVAL_TASKS
    from stackops_harness.corpus import MIX, mixed_corpus_tokens
    from stackops_harness.report import run_summary

    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_ids, val_ids, meta = mixed_corpus_tokens(**dict(MIX, max_mb=args.max_mb))
    timings["corpus"] = time.perf_counter() - t0
    print(f"corpus: {train_ids.size:,} train / {val_ids.size:,} val tokens "
          f"({timings['corpus']:.1f}s) on {jax.devices()[0]}", flush=True)
    cfg0 = next(iter(configs.values()))
    tasks = list(EVAL_TASKS)
    suite = R.PrimitiveSuite(R.PrimitiveEvalConfig(
        tasks=tuple(tasks), n_eval=args.n_eval, max_len=cfg0.seq_len,
        batch_size=32 if args.tiny else 128, greedy_n=min(100, args.n_eval)))
    seeds = list(range(args.seeds))
    tf_from = cfg0.total_steps - 2 * cfg0.eval_every  # the last three evaluations
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    raw: dict[str, Any] = {}
    for method, cfg in configs.items():
        t0 = time.perf_counter()
        res, prim_s = train_method(cfg, seeds, train_ids, val_ids, suite, tf_from)
        timings[method] = time.perf_counter() - t0
        timings[f"{method}_primitive_eval"] = prim_s
        timings[f"{method}_compile"] = res.seconds["compile"]
        runs[method] = {s: run_summary(_per_seed_records(res.history, i, tasks), tasks)
                        for i, s in enumerate(seeds)}
        raw[method] = {"history": res.history, "seconds": res.seconds, "depth": res.depth}
        print(f"{method}: {timings[method]:.0f}s, final val loss "
              f"{np.mean(res.history[-1]['val_loss']):.4f} (mean of {len(seeds)})", flush=True)
    analysis = Cl.analyse(runs, tasks=tasks,
                          reasoning_tasks=[t for t in tasks if t in P.REASONING_TASKS],
                          recall_tasks=[t for t in tasks if t not in P.REASONING_TASKS],
                          ideal_speedup=so.ideal_speedup(cfg0.stages, cfg0.alpha))
    mfu = None
    if not args.skip_mfu:
        t0 = time.perf_counter()
        mfu = measure_mfu(args)
        timings["mfu"] = time.perf_counter() - t0
        (args.out / "mfu.json").write_text(json.dumps(mfu, indent=2))
    timings["total"] = time.perf_counter() - t_all
    md = [f"# Accelerator run: {len(seeds)} seeds x {', '.join(configs)}", "",
          f"Device: {jax.devices()[0]}. Model: the default preset's ({cfg0.depth} blocks of "
          f"width {cfg0.d_model}, context {cfg0.seq_len}, {cfg0.global_batch} sequences per "
          f"step), {cfg0.total_steps} steps, each method's seeds trained as one vmapped "
          "program. Wall times are the whole ensemble's, shared by its seeds.", "",
          *Cl.markdown(analysis, tasks=tasks,
                       reasoning_tasks=[t for t in tasks if t in P.REASONING_TASKS],
                       floors=suite.floors, shots=suite.shots, n_eval=args.n_eval, tf_evals=3)]
    if mfu:
        md += ["## gpu preset step time and MFU", "",
               f"{mfu['params']:,} parameters, {mfu['config']}: {mfu['step_seconds'] * 1e3:.1f} "
               f"ms per step, {mfu['achieved_tflops']:.1f} TFLOP/s counted, MFU "
               f"{mfu['mfu']:.1%} of {mfu['peak_tflops']:g} TFLOP/s ({mfu['peak_source']}).", ""]
    md += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    summary = {**analysis, "floors": suite.floors, "shots": suite.shots, "n_eval": args.n_eval,
               "corpus": meta, "mfu": mfu, "timings": timings,
               "configs": {m: {k: v for k, v in vars(c).items()} for m, c in configs.items()}}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "history.json").write_text(json.dumps(raw, default=float))
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2))
    (args.out / "report.md").write_text("\n".join(md))
    print("\n".join(md[:10]))
    return summary


def entry() -> int:
    """The `python experiments/gpu_run.py` program."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
