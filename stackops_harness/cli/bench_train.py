"""Benchmark the training harness: step throughput against PyTorch, compile time per stage,
and the wall-clock speedup of a stagewise run against the speedup its FLOPs predict.

    python experiments/bench_train.py --quick          # a few minutes on two CPU cores
    python experiments/bench_train.py                  # the cpu preset, longer runs
    python experiments/bench_train.py --set d_model=256 --set seq_len=256

Three tables:

1. Training-step throughput of one model and batch (fp32, AdamW, clipping): the harness's
   step (`stackops_harness.state.compile_stage`: scan over layers, then unrolled, with the
   attention core `auto` picks and with XLA's), the same step with the attention core
   removed (a diagnostic: what attention costs), and plain PyTorch eager (`pip install
   torch==2.13.0`; skipped with a message when torch is missing). Tokens/s, achieved
   FLOP/s (counted from the architecture) and the ratio to PyTorch.
2. Ahead-of-time compile time of the train step at each stage's depth, scanned and
   unrolled.
3. A whole stagewise run (`stackops_harness.trainer.train`) against the baseline with the same
   budget: counted FLOPs, wall time by activity, the measured speedup next to the speedup
   the FLOPs predict (embedding and head included), and the overhead of compilation,
   growth and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stackops_harness import require_extras

if "--single-thread" in sys.argv:
    # Must happen before JAX starts: one core for XLA, as for PyTorch. On a shared
    # machine a single-core comparison is far less disturbed by other processes
    # (PyTorch's OpenMP threads suffer most when a core is taken). XLA's flags alone no
    # longer limit its thread pool (jax 0.10), so the process (and the PyTorch processes
    # it starts) is pinned to one core; XLA sizes its pool from that affinity.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax
import numpy as np

from stackops.models import flops_per_token
from stackops_harness.config import TrainConfig, apply_overrides, config_to_dict, preset
from stackops_harness.methods import check_method_name, growth_schedule
from stackops_harness.metrics import read_metrics
from stackops_harness.sharding import batch_sharding, make_mesh, shard_rows
from stackops_harness.state import (
    check_schedule,
    compile_stage,
    lm_config,
    make_optimizer,
    make_train_step,
    run_attention,
    skeleton,
)
from stackops_harness.trainer import prepare_data, train

# --------------------------------------------------------------------------- helpers


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (right-aligned numbers), as printed by this script."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "-" * len(title)]
    for r in cells:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines)


def step_flops(cfg: TrainConfig, depth: int) -> float:
    """Counted model FLOPs of one training step at `depth` blocks."""
    return flops_per_token(lm_config(cfg, depth), depth, cfg.seq_len) * cfg.tokens_per_step


# --------------------------------------------------------------------------- JAX variants


def no_attention_core(
    q: jax.Array, k: jax.Array, v: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None
) -> jax.Array:
    """A diagnostic, not a model: an attention core that skips the scores, mask and
    softmax (each position reads its own value vector), so the difference in step time is
    what the attention core costs. `q` and `k` stay in the graph so their projections are
    still computed and differentiated."""
    return v + 0.0 * (q + k)


def jax_step(cfg: TrainConfig, mesh: Any, variant: str) -> tuple[Any, Any, Any]:
    """The trainer's compiled train step of the final-depth model and its initial state
    (`stackops_harness.state.compile_stage`).

    `variant`: `"harness"` (exactly the trainer's step), or `"no-attention-core"` (the same
    step with [`no_attention_core`][] as the attention core, a diagnostic).
    """
    if variant not in ("harness", "no-attention-core"):
        raise ValueError(f"variant must be 'harness' or 'no-attention-core', got {variant!r}.")
    core = no_attention_core if variant == "no-attention-core" else None
    stage = compile_stage(cfg, cfg.depth, mesh, attention=core)
    return stage.step, stage.params, stage.opt_state


# --------------------------------------------------------------------------- PyTorch


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _torch_in_subprocess(
    cfg: TrainConfig, steps: int, threads: int, attention: str = "sdpa"
) -> float:
    """Seconds per step of `torch_step` measured in a fresh process (after two warm-ups)."""
    import subprocess

    payload = json.dumps(
        {
            "config": config_to_dict(cfg),
            "steps": steps,
            "threads": threads,
            "attention": attention,
        }
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--torch-worker", payload],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _torch_worker(payload: str) -> None:
    from stackops_harness.config import config_from_dict

    spec = json.loads(payload)
    step = torch_step(config_from_dict(spec["config"]), spec["threads"], spec["attention"])
    step()
    step()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    print((time.perf_counter() - t0) / spec["steps"])


def torch_step(cfg: TrainConfig, threads: int, attention: str = "sdpa") -> Any:
    """A plain PyTorch (eager) train step of the same model and batch.

    `attention="sdpa"`: `F.scaled_dot_product_attention` (a fused kernel on CPU);
    `"naive"`: the same math written out (scores, mask, softmax, weighted sum), as XLA runs it.
    """
    if attention not in ("sdpa", "naive"):
        raise ValueError(f"`attention` must be 'sdpa' or 'naive', got {attention!r}.")
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    d, n_heads, depth, t = cfg.d_model, cfg.n_heads, cfg.depth, cfg.seq_len
    ff = cfg.d_ff or 4 * d
    hd = d // n_heads

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale

    inv = 1.0 / (10000 ** (torch.arange(0, hd // 2).float() * 2 / hd))
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def rope(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def param(*shape, std=0.02):
        return torch.nn.Parameter(torch.randn(*shape) * std)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = Norm(), Norm()
            self.wqkv, self.wo = param(d, 3 * d), param(d, d)
            self.w_in, self.w_out = param(d, ff), param(ff, d)

        def forward(self, x):
            b = x.shape[0]
            q, k, v = (self.norm1(x) @ self.wqkv).view(b, t, 3, n_heads, hd).unbind(2)
            q, k = rope(q), rope(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if attention == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                s = s.masked_fill(~causal, float("-inf"))
                o = torch.softmax(s, dim=-1) @ v
            x = x + o.transpose(1, 2).reshape(b, t, d) @ self.wo
            return x + F.gelu(self.norm2(x) @ self.w_in, approximate="tanh") @ self.w_out

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = param(cfg.vocab_size, d)
            self.blocks = torch.nn.ModuleList([Block() for _ in range(depth)])
            self.norm_f = Norm()
            self.head = param(d, cfg.vocab_size)

        def forward(self, tokens):
            x = self.embed[tokens]
            for block in self.blocks:
                x = block(x)
            return self.norm_f(x) @ self.head

    model = LM()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=(cfg.b1, cfg.b2),
    )
    tokens = torch.randint(0, cfg.vocab_size, (cfg.global_batch, t + 1))

    def step() -> float:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- sections


def bench_steps(cfg: TrainConfig, *, repeats: int, steps: int, threads: int) -> dict[str, Any]:
    """Table 1: ms per step of each implementation, timed in turns (interleaved)."""
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    batch = shard_rows(
        rng.integers(0, cfg.vocab_size, (cfg.global_batch, cfg.seq_len + 1)).astype(np.int32), mesh
    )
    variants: dict[str, Any] = {}
    kernel = run_attention(apply_overrides(cfg, ["attention=auto"]), mesh)[0] == "cpu-kernel"
    if not kernel:
        print("The CPU attention kernel does not apply or cannot be built here: XLA's only.")
    harness_name = f"jax: harness step, unrolled, {'cpu-kernel' if kernel else 'xla'} attention"
    xla_name = "jax: harness step, unrolled, xla attention"
    bare_name = "diagnostic: harness step, unrolled, attention core removed"
    specs = [
        (harness_name.replace("unrolled", "scan (unroll=1)"), "harness", 1, "auto"),
        (harness_name, "harness", 0, "auto"),
        (xla_name, "harness", 0, "xla"),
        (bare_name, "no-attention-core", 0, "xla"),
    ]
    for name, variant, unroll, attention in specs:
        if name in variants:  # the kernel does not apply: the xla row is already there
            continue
        c = apply_overrides(cfg, [f"unroll={unroll}", f"attention={attention}"])
        compiled, params, opt_state = jax_step(c, mesh, variant)
        state = {"p": params, "o": opt_state}

        def run(compiled=compiled, state=state) -> None:
            state["p"], state["o"], m = compiled(state["p"], state["o"], batch)
            jax.block_until_ready(m["loss"])

        variants[name] = run
    torch_name = "torch: eager, SDPA attention"
    torch_naive = "torch: eager, attention written out (as XLA runs it)"
    has_torch = _torch_available()
    if not has_torch:
        print(
            "torch is not installed: the PyTorch column is skipped "
            "(pip install torch==2.13.0 installs a CPU build)."
        )
    for fn in variants.values():  # warm up (first calls allocate)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    if has_torch:
        times[torch_name] = []
        times[torch_naive] = []
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
        if has_torch:
            # PyTorch runs in its own process: its OpenMP threads and XLA's thread pool
            # slow each other down badly when they share one process and two cores.
            times[torch_name].append(_torch_in_subprocess(cfg, steps, threads))
            times[torch_naive].append(_torch_in_subprocess(cfg, steps, threads, "naive"))
    flops = step_flops(cfg, cfg.depth)
    ref = min(times[next(iter(variants))])
    torch_t = min(times[torch_name]) if has_torch else None
    rows: list[list[Any]] = []
    out: dict[str, Any] = {}
    for name, ts in times.items():
        t = min(ts)
        ratio = (torch_t / t) if torch_t else (ref / t)
        rows.append([name, t * 1e3, cfg.tokens_per_step / t, flops / t / 1e9, ratio])
        out[name] = {
            "ms": t * 1e3,
            "tokens_per_s": cfg.tokens_per_step / t,
            "gflops": flops / t / 1e9,
        }
    header = [
        "implementation",
        "ms/step",
        "tokens/s",
        "GFLOP/s",
        "x torch" if torch_t else "x first",
    ]
    title = (
        f"1. Train-step throughput: d={cfg.d_model}, depth={cfg.depth}, T={cfg.seq_len}, "
        f"B={cfg.global_batch}, fp32, {jax.device_count()} device(s), best of {repeats} "
        f"rounds of {steps} steps"
    )
    print(table(title, header, rows), flush=True)
    best = {k: min(v) for k, v in times.items()}
    full, bare = best[xla_name], best[bare_name]
    print(
        f"Attention core (scores, mask, softmax, weighted sum, and their gradients) in the "
        f"JAX step with XLA's attention: {(full - bare) * 1e3:.0f} of {full * 1e3:.0f} ms "
        f"({(full - bare) / full:.0%})."
    )
    if kernel:
        saved = best[xla_name] - best[harness_name]
        speedup = best[xla_name] / best[harness_name]
        print(
            f"The fused CPU attention kernel makes the harness step {speedup:.2f}x faster "
            f"({saved * 1e3:.0f} ms saved of the attention core's {(full - bare) * 1e3:.0f})."
        )
        out["kernel_speedup"] = speedup
    if has_torch:
        print(
            f"PyTorch's fused SDPA kernel against the same math written out: "
            f"{best[torch_naive] / best[torch_name]:.2f}x faster; the harness step against "
            f"PyTorch SDPA: {best[torch_name] / best[harness_name]:.2f}x."
        )
    out["attention_core_ms"] = (full - bare) * 1e3
    print(flush=True)
    return out


def bench_compile(cfg: TrainConfig, *, unrolls: list[int]) -> dict[str, Any]:
    """Table 2: AOT compile time of the train step at each stage's depth."""
    mesh = make_mesh()
    sched = growth_schedule(cfg)
    depths = check_schedule(cfg, sched)
    rows, out = [], {}
    for stage, depth in enumerate(depths):
        row: list[Any] = [stage + 1, depth]
        for unroll in unrolls:
            c = apply_overrides(cfg, [f"unroll={unroll}"])
            optimizer, _ = make_optimizer(c)
            sk = skeleton(c, sched, stage, mesh, optimizer)
            tokens = jax.ShapeDtypeStruct(
                (c.global_batch, c.seq_len + 1), np.int32, sharding=batch_sharding(mesh)
            )
            lowered = make_train_step(c, sk, optimizer, mesh).lower(sk.params, sk.opt_state, tokens)
            t0 = time.perf_counter()
            lowered.compile()
            row.append(time.perf_counter() - t0)
            out[f"stage{stage + 1}_unroll{unroll}"] = row[-1]
        rows.append(row)
    header = ["stage", "depth"] + [
        "compile s (scan)" if u == 1 else "compile s (unrolled)" for u in unrolls
    ]
    print(table("2. Compile time of the train step per stage", header, rows), "\n", flush=True)
    return out


def bench_stage_steps(cfg: TrainConfig, *, repeats: int, steps: int) -> dict[str, Any]:
    """Table 3a: step time at each stage's depth, timed in turns, against counted FLOPs.

    A whole run measures stages minutes apart, so on a shared machine their speeds drift;
    timing the stages' steps in turns isolates how step time scales with depth.
    """
    mesh = make_mesh()
    sched = growth_schedule(cfg)
    depths = check_schedule(cfg, sched)
    rng = np.random.default_rng(0)
    batch = shard_rows(
        rng.integers(0, cfg.vocab_size, (cfg.global_batch, cfg.seq_len + 1)).astype(np.int32), mesh
    )
    runners = {}
    for depth in sorted(set(depths)):
        compiled_stage = compile_stage(cfg, depth, mesh)
        compiled = compiled_stage.step
        state = {"p": compiled_stage.params, "o": compiled_stage.opt_state}

        def run(compiled=compiled, state=state) -> None:
            state["p"], state["o"], m = compiled(state["p"], state["o"], batch)
            jax.block_until_ready(m["loss"])

        run()
        runners[depth] = run
    times: dict[int, list[float]] = {d: [] for d in runners}
    for _ in range(repeats):
        for depth, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            times[depth].append((time.perf_counter() - t0) / steps)
    t = {d: min(ts) for d, ts in times.items()}
    final = depths[-1]
    rows = []
    for stage, (n, depth) in enumerate(zip(sched.lengths, depths)):
        f = step_flops(cfg, depth)
        rows.append(
            [
                stage + 1,
                depth,
                n,
                f / 1e9,
                t[depth] * 1e3,
                f / step_flops(cfg, final),
                t[depth] / t[final],
            ]
        )
    flops_speedup = (
        sum(sched.lengths)
        * step_flops(cfg, final)
        / sum(n * step_flops(cfg, d) for n, d in zip(sched.lengths, depths))
    )
    time_speedup = (
        sum(sched.lengths) * t[final] / sum(n * t[d] for n, d in zip(sched.lengths, depths))
    )
    header = ["stage", "depth", "steps", "GFLOP/step", "ms/step", "FLOPs vs final", "time vs final"]
    title = f"3a. Step time per stage ({cfg.method}, timed in turns, best of {repeats})"
    print(table(title, header, rows))
    print(
        f"speedup over the baseline: FLOPs predict {flops_speedup:.3f}, step times give "
        f"{time_speedup:.3f} ({100 * (time_speedup / flops_speedup - 1):+.1f}%)\n",
        flush=True,
    )
    return {
        "ms_per_step": {d: v * 1e3 for d, v in t.items()},
        "flops_speedup": flops_speedup,
        "step_time_speedup": time_speedup,
    }


def bench_run(cfg: TrainConfig, out_dir: Path, methods: list[str]) -> dict[str, Any]:
    """Table 3: whole runs of each method against the baseline, same budget and data."""
    results: dict[str, dict[str, Any]] = {}
    for method in ["baseline", *methods]:
        c = apply_overrides(cfg, [f"method={method}", "progress=false"])
        run_dir = out_dir / method
        t0 = time.perf_counter()
        res = train(c, run_dir, resume=False)
        wall = time.perf_counter() - t0
        end = read_metrics(res.metrics_path, "end")[-1]
        results[method] = {**end, "wall": wall}
    base = results["baseline"]
    rows = []
    for method, r in results.items():
        predicted = base["flops"] / r["flops"]
        train_speedup = base["time_train"] / r["time_train"]
        steps_total = r["time_train"] + r["time_grow"] + r["time_compile"] + r["time_ckpt"]
        base_total = (
            base["time_train"] + base["time_grow"] + base["time_compile"] + base["time_ckpt"]
        )
        rows.append(
            [
                method,
                r["flops"] / 1e12,
                r["time_train"],
                r["time_compile"],
                r["time_grow"],
                r["time_ckpt"],
                r["time_eval"],
                predicted,
                train_speedup,
                base_total / steps_total,
                100 * (train_speedup / predicted - 1),
                r["val_loss"],
            ]
        )
        r.update(predicted_speedup=predicted, train_speedup=train_speedup)
    header = [
        "method",
        "TFLOP",
        "train s",
        "compile s",
        "grow s",
        "ckpt s",
        "eval s",
        "FLOPs speedup",
        "train-time speedup",
        "all-in speedup",
        "gap %",
        "val loss",
    ]
    title = (
        f"3b. Whole runs: {cfg.total_steps} steps, {cfg.stages} stages, alpha={cfg.alpha} "
        f"(all-in = train + compile + grow + checkpoints; gap = train-time vs FLOPs speedup)"
    )
    print(table(title, header, rows), "\n", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its three tables; returns the numbers as a dict.

    !!! Example

        `python experiments/bench_train.py --quick --json bench.json`
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", default="midas", help="comma-separated methods to run")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: steps,compile,stages,run"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument(
        "--single-thread", action="store_true", help="one core (pinned) for XLA and for PyTorch"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directories (default: a temp dir)"
    )
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker is not None:
        _torch_worker(args.torch_worker)
        return {}

    cfg = preset(args.preset, progress=False)
    if args.quick:
        cfg = apply_overrides(
            cfg,
            [
                "total_steps=120",
                "warmup_steps=10",
                "eval_every=60",
                "ckpt_every=60",
                "log_every=10",
            ],
        )
    cfg = apply_overrides(cfg, args.set)
    try:  # every method named, before any benchmark runs
        for method in {cfg.method, *args.methods.split(",")}:
            check_method_name(method)
    except ValueError as e:
        raise SystemExit(f"stackops-bench-train: --methods/--set: {e}") from None
    if args.single_thread:
        args.threads = 1
    skip = set(filter(None, args.skip.split(",")))
    prepare_data(cfg)
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)), "
        f"{os.cpu_count()} CPU cores"
        + (" (single-threaded)" if args.single_thread else "")
        + f"; config: {args.preset}"
        + (" --quick" if args.quick else "")
        + (f" {' '.join(args.set)}" if args.set else "")
        + "\n",
        flush=True,
    )
    out: dict[str, Any] = {}
    if "steps" not in skip:
        out["steps"] = bench_steps(
            cfg, repeats=3 if args.quick else 5, steps=3 if args.quick else 5, threads=args.threads
        )
    if "compile" not in skip:
        out["compile"] = bench_compile(cfg, unrolls=[1, 0])
    if "stages" not in skip:
        out["stages"] = bench_stage_steps(
            apply_overrides(cfg, [f"method={args.methods.split(',')[0]}"]),
            repeats=3 if args.quick else 5,
            steps=3 if args.quick else 5,
        )
    if "run" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            out["run"] = bench_run(cfg, args.out or Path(tmp), args.methods.split(","))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


def entry() -> int:
    """Console script `stackops-bench-train` (also `python experiments/bench_train.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-bench-train")
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
