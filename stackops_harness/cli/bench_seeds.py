"""Benchmark: N seeds of one method as one vmapped program against N sequential runs.

    python experiments/bench_seeds.py                 # tiny model, 4 seeds, CPU
    python experiments/bench_seeds.py --seeds 8 --steps 60 --method gradstack

Both sides train the same config on the same batches (`stackops_harness.ensemble`); the
sequential side runs `train_ensemble` once per seed with a one-member ensemble. Prints wall
time (compilation and steps apart) and the ratio, and checks that the vmapped members end
at the same validation losses as the sequential runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--method", default="midas")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < args.depth:
        raise SystemExit("--seeds must be >= 1 and --steps >= --depth")

    import numpy as np

    from stackops_harness.config import preset
    from stackops_harness.ensemble import RandomWindows, fixed_windows, train_ensemble
    from stackops_harness.report import markdown_table

    cfg = preset("smoke", method=args.method, d_model=args.d_model, n_heads=2,
                 depth=args.depth, stages=args.depth if args.method != "baseline" else 1,
                 seq_len=args.seq_len, global_batch=args.batch, total_steps=args.steps,
                 warmup_steps=1, eval_every=args.steps)
    tokens = np.random.default_rng(0).integers(0, 256, 200_000)
    val = fixed_windows(tokens, seq_len=cfg.seq_len, batch=8, num_batches=1)
    seeds = list(range(args.seeds))

    def run(members: list[int]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        res = train_ensemble(cfg, members, RandomWindows(tokens, seq_len=cfg.seq_len,
                                                        batch=cfg.global_batch, seeds=members),
                             val, log=None)
        return res, time.perf_counter() - t0

    vm, vm_s = run(seeds)
    seq = [run([s]) for s in seeds]
    seq_s = sum(t for _, t in seq)
    seq_compile = sum(r.seconds["compile"] for r, _ in seq)
    seq_train = sum(r.seconds["train"] + r.seconds["grow"] for r, _ in seq)
    vm_train = vm.seconds["train"] + vm.seconds["grow"]
    loss_vm = vm.history[-1]["val_loss"]
    loss_seq = [r.history[-1]["val_loss"][0] for r, _ in seq]
    max_diff = float(np.max(np.abs(np.subtract(loss_vm, loss_seq))))
    rows = [
        ["end to end", f"{seq_s:.2f}", f"{vm_s:.2f}", f"{seq_s / vm_s:.2f}x"],
        ["compilation", f"{seq_compile:.2f}", f"{vm.seconds['compile']:.2f}",
         f"{seq_compile / max(vm.seconds['compile'], 1e-9):.2f}x"],
        ["steps + growth", f"{seq_train:.2f}", f"{vm_train:.2f}",
         f"{seq_train / max(vm_train, 1e-9):.2f}x"],
    ]
    print(f"{args.seeds} seeds of {args.method}, {args.steps} steps, d={args.d_model}, "
          f"depth {args.depth}, T={args.seq_len}, B={args.batch} (wall seconds)")
    print(markdown_table(["", f"{args.seeds} sequential runs", "one vmapped run",
                          "sequential / vmapped"], rows))
    print(f"max |val loss vmapped - sequential| over seeds: {max_diff:.2e}")
    return {"sequential_s": seq_s, "vmapped_s": vm_s, "speedup": seq_s / vm_s,
            "steps_speedup": seq_train / max(vm_train, 1e-9), "max_loss_diff": max_diff}


def entry() -> int:
    """The `python experiments/bench_seeds.py` program."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
