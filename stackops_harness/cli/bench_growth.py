"""How long does `stackops.grow` take next to the physical floor: one copy of the grown weights?

Reading the table
-----------------
For each model size (a `DecoderLM` whose blocks are a `stackops.Stack`, from ~1M to ~500M
parameters, fp32) and each operator (`middle_stack`, `last_stack`, `interpolate` with
`t=0.5`, and `interpolate` with `t=0.25` as `interp_t=0.25`: unequal weights once sent XLA's
CPU reduction down a path ~100x slower than a copy), each adding `block` layers (about a
quarter of the depth; the size column reads `d{d_model}xL{depth}+{block}`), the script
times

- `grow`: `so.grow(model, op, where=lambda m: m.blocks)` followed by
  `jax.block_until_ready` on the result;
- `grow_opt_state`: `so.grow_opt_state(adamw, state, op, where=lambda m: m.blocks,
  params=model)` on a full AdamW state (`mu` and `nu` hold real, random numbers, not zeros);

and, in the same process and interleaved with them, the **floor**:

- for `grow`: a jitted `jnp.concatenate([a, a[:k]])` over every array leaf of the blocks,
  where `k` is the number of layers the operator adds. Its outputs have exactly the grown
  shapes; it reads each input byte once (the `k` extra rows twice) and writes each output
  byte once into freshly allocated buffers, as `grow` must. That is one device copy of the
  grown parameters: no growth implementation that returns new arrays (inputs are not
  donated, the input model stays valid) can do less memory traffic. Only the blocks are
  grown; the embedding, head and final norm are shared with the input model by reference,
  so they are not part of the floor either.
- for `grow_opt_state`: the same copy over the blocks of both `mu` and `nu` (the only
  parameter-shaped parts of an AdamW state that change; the step count is kept as is).

Columns: `params` = all parameters of the model before growth (`blocks` = those in the
stack); `grown GB` = bytes of the grown blocks (what the floor writes); `first s` = the first
call, which includes tracing and XLA compilation; `warm s` = median of `--reps` later calls;
`floor s` = median of the floor's warm calls (measured in the same rounds, so machine noise
hits both alike); `ratio` = warm / floor. A ratio near 1 means growth runs at memory-copy
speed; the target is a ratio of at most 1.5 at the largest size, for every operator and
for the optimizer state. At small sizes the fixed Python cost of a call (tree surgery,
dispatch, and for `grow_opt_state` matching the state to the model) is comparable to the
copy itself, so ratios there are large and say little; `--quick` reports its verdict for
its own largest (small) size, as a smoke check only.

Other layouts (`--layouts`, on by default): at each size the same blocks' parameters are
also grown as a MaxText-style parameter dict whose leaves carry the layer axis at position 1
(`grow axis=1`: `so.grow(params, op, where=..., axis=1)`, floor: the same concatenation along
axis 1), and, when haliax is installed (the `interop` extra), as a haliax `Stacked` of an
MLP block with the same parameter count (`grow haliax`; floor: the copy of its arrays).

Models are never run, only grown, so large sizes are built cheaply: the module structure
comes from `jax.eval_shape(DecoderLM(...))` and every leaf is then filled with seeded random
numbers. Outputs are deleted between calls and inputs between sizes to bound peak memory
(the largest size needs about 2 GB of parameters + 4 GB of AdamW state + ~5 GB for a grown
state); the optimizer-state part is skipped, with a message, where its estimated peak would
exceed `--mem-budget-gib` or the memory the machine has available.

Usage::

    .venv/bin/python experiments/bench_growth.py            # ~1M .. ~500M parameters
    .venv/bin/python experiments/bench_growth.py --quick    # small sizes, under a minute
    .venv/bin/python experiments/bench_growth.py --max-params 50M --out bench.json

Timings on shared CPU machines vary by 10-30% between runs; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import stackops as so
from stackops.models import DecoderLM, LMConfig

# (d_model, depth, block): growth adds `block` layers (~20-25% of the depth).
SIZES: list[tuple[int, int, int]] = [
    (128, 4, 1),  # ~0.9M parameters
    (256, 8, 2),  # ~6.4M
    (512, 12, 3),  # ~38M
    (1024, 16, 4),  # ~202M
    (2048, 10, 2),  # ~504M
]
QUICK_SIZES = SIZES[:2]
TARGET_RATIO = 1.5
GIB = 1024**3


def operators(block: int) -> dict[str, so.AbstractGrowth]:
    return {
        "middle_stack": so.middle_stack(block=block),
        "last_stack": so.last_stack(block=block),
        "interpolate": so.interpolate(block=block, t=0.5),
        # Unequal weights: a separate row, since they once hit a slow XLA reduction on CPU.
        "interp_t=0.25": so.interpolate(block=block, t=0.25),
    }


def config_for(d_model: int, depth: int) -> LMConfig:
    return LMConfig(d_model=d_model, n_heads=max(1, d_model // 64), n_layers=depth, max_len=256)


def _fill(abstract: Any, key: jax.Array) -> Any:
    """Materialise a tree of ShapeDtypeStructs: floats random in [0, 1), the rest zeros."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, max(1, len(leaves)))
    out = []
    for k, leaf in zip(keys, leaves):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim > 0:
            fn = jax.jit(lambda k, s=leaf.shape, dt=leaf.dtype: jax.random.uniform(k, s, dt))
            out.append(fn(k))
        else:
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def build_model(d_model: int, depth: int, seed: int) -> DecoderLM:
    cfg = config_for(d_model, depth)
    abstract = jax.eval_shape(lambda k: DecoderLM(cfg, key=k), jax.random.key(seed))
    return jax.block_until_ready(_fill(abstract, jax.random.key(seed + 1)))


def build_opt_state(optimizer: optax.GradientTransformation, params: Any, seed: int) -> Any:
    abstract = jax.eval_shape(optimizer.init, params)
    return jax.block_until_ready(_fill(abstract, jax.random.key(seed + 2)))


def n_params(tree: Any) -> int:
    """Floating-point leaves' sizes (arrays or ShapeDtypeStructs)."""
    return sum(
        x.size
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def n_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def copy_floor(k: int) -> Callable[[Any], Any]:
    """One device copy of the grown arrays: each leaf `a` -> `concatenate([a, a[:k]])`."""
    return jax.jit(lambda t: jax.tree.map(lambda a: jnp.concatenate([a, a[:k]], axis=0), t))


def _timed_call(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    dt = time.perf_counter() - t0
    del out
    gc.collect()
    return dt


def measure(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, Any]]:
    """First call of each function (compile included), then `reps` interleaved warm rounds."""
    res: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        res[name] = {"first_s": _timed_call(fn), "warm_all_s": []}
    for _ in range(reps):
        for name, fn in fns.items():
            res[name]["warm_all_s"].append(_timed_call(fn))
    for r in res.values():
        r["warm_s"] = statistics.median(r["warm_all_s"])
    return res


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMGB" else s) * mult)


def bench_size(
    d_model: int, depth: int, block: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], str | None]:
    rows: list[dict[str, Any]] = []
    where = lambda m: m.blocks
    model = build_model(d_model, depth, args.seed)
    total, stacked = n_params(model), n_params(model.blocks)
    blocks_bytes = n_bytes(model.blocks)
    grown_bytes = blocks_bytes * (depth + block) // depth
    size = f"d{d_model}xL{depth}+{block}"
    base = {
        "size": size,
        "d_model": d_model,
        "depth": depth,
        "block": block,
        "params": total,
        "block_params": stacked,
    }
    ops = operators(block)

    # --- grow vs one copy of the grown blocks ------------------------------------------------
    blocks_arrays = eqx.filter(model.blocks.layers, eqx.is_array)
    floor = copy_floor(block)
    fns: dict[str, Callable[[], Any]] = {"floor": functools.partial(floor, blocks_arrays)}
    for name, op in ops.items():
        fns[name] = functools.partial(so.grow, model, op, where=where)
    res = measure(fns, args.reps)
    for name in ops:
        rows.append(
            {
                **base,
                "kind": "grow",
                "op": name,
                "grown_bytes": grown_bytes,
                "floor_s": res["floor"]["warm_s"],
                "floor_all_s": res["floor"]["warm_all_s"],
                "floor_first_s": res["floor"]["first_s"],
                **res[name],
                "ratio": res[name]["warm_s"] / res["floor"]["warm_s"],
            }
        )
    del fns, res, blocks_arrays
    gc.collect()

    # --- grow_opt_state vs one copy of the grown mu and nu blocks ----------------------------
    skipped = None
    if not args.no_opt:
        param_bytes = n_bytes(eqx.filter(model, eqx.is_inexact_array))
        # model + AdamW state (mu, nu) + a grown state's blocks (mu, nu; the floor's output is
        # the same size and never alive at the same time) + 1 GiB for the process.
        need = n_bytes(model) + 2 * param_bytes + 2 * grown_bytes + GIB
        avail = mem_available_bytes()
        limit = args.mem_budget_gib * GIB
        if avail is not None:
            limit = min(limit, int(0.9 * (avail + n_bytes(model))))
        if need > limit:
            skipped = (
                f"{size}: grow_opt_state not measured: estimated peak {need / GIB:.1f} GiB "
                f"exceeds the limit {limit / GIB:.1f} GiB (--mem-budget-gib / available)"
            )
        else:
            opt = optax.adamw(1e-3)
            params = eqx.filter(model, eqx.is_inexact_array)
            state = build_opt_state(opt, params, args.seed)
            adam = state[0]
            moments = (
                eqx.filter(adam.mu.blocks.layers, eqx.is_array),
                eqx.filter(adam.nu.blocks.layers, eqx.is_array),
            )
            del adam
            fns = {"floor": functools.partial(floor, moments)}
            for name, op in ops.items():
                fns[name] = functools.partial(
                    so.grow_opt_state, opt, state, op, where=where, params=model
                )
            res = measure(fns, args.reps)
            for name in ops:
                rows.append(
                    {
                        **base,
                        "kind": "grow_opt_state",
                        "op": name,
                        "grown_bytes": 2 * grown_bytes,
                        "floor_s": res["floor"]["warm_s"],
                        "floor_all_s": res["floor"]["warm_all_s"],
                        "floor_first_s": res["floor"]["first_s"],
                        **res[name],
                        "ratio": res[name]["warm_s"] / res["floor"]["warm_s"],
                    }
                )
            del fns, res, moments, state, params
    if not args.no_layouts:
        rows.extend(bench_layouts(model, d_model, depth, block, args))
    del model
    gc.collect()
    return rows, skipped


def _axis1_dict(model: DecoderLM, seed: int) -> dict[str, Any]:
    """The blocks' parameters as a MaxText-style dict: every leaf has the layer axis at 1."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model.blocks.layers, eqx.is_array))
    abstract = {
        jax.tree_util.keystr(path): jax.ShapeDtypeStruct(
            (a.shape[1], a.shape[0], *a.shape[2:]), a.dtype
        )
        for path, a in leaves
    }
    return {"params": {"decoder": {"layers": _fill(abstract, jax.random.key(seed + 3))}}}


def _haliax_stacked(d_model: int, depth: int, ff: int, seed: int) -> Any:
    """A haliax `Stacked` of a two-matrix MLP block (d_model x ff each way), or None."""
    try:
        import haliax as hax
        import haliax.nn as hnn
    except ImportError:
        return None
    Layer, D, F = hax.Axis("layer", depth), hax.Axis("embed", d_model), hax.Axis("mlp", ff)

    class Mlp(eqx.Module):
        up: hnn.Linear
        down: hnn.Linear

        @staticmethod
        def init(*, key: jax.Array) -> Mlp:
            k1, k2 = jax.random.split(key)
            return Mlp(hnn.Linear.init(D, F, key=k1), hnn.Linear.init(F, D, key=k2))

    abstract = jax.eval_shape(
        lambda k: hnn.Stacked.init(Layer, Mlp)(key=jax.random.split(k, depth)),
        jax.random.key(seed),
    )
    return jax.block_until_ready(_fill(abstract, jax.random.key(seed + 4)))


def bench_layouts(
    model: DecoderLM, d_model: int, depth: int, block: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """`grow` on a MaxText-style axis-1 dict and a haliax `Stacked`, each next to its floor."""
    rows: list[dict[str, Any]] = []
    ops = {"middle_stack": so.middle_stack(block=block),
           "interp_t=0.25": so.interpolate(block=block, t=0.25)}
    params = _axis1_dict(model, args.seed)
    where = lambda p: p["params"]["decoder"]["layers"]
    layers = where(params)
    floor1 = jax.jit(
        lambda t: jax.tree.map(lambda a: jnp.concatenate([a, a[:, :block]], axis=1), t)
    )
    cases: list[tuple[str, Any, Callable[[], Any], dict[str, Callable[[], Any]]]] = [
        (
            "grow axis=1",
            layers,
            functools.partial(floor1, layers),
            {n: functools.partial(so.grow, params, op, where=where, axis=1)
             for n, op in ops.items()},
        )
    ]
    stacked = _haliax_stacked(d_model, depth, config_for(d_model, depth).ff, args.seed)
    if stacked is not None:
        raw = [x for x in jax.tree.leaves(stacked) if eqx.is_array(x)]
        cases.append(
            (
                "grow haliax",
                raw,
                functools.partial(copy_floor(block), raw),
                {n: functools.partial(so.grow, stacked, op, where=lambda s: s)
                 for n, op in ops.items()},
            )
        )
    for kind, arrays, floor_fn, grow_fns in cases:
        nb = n_bytes(arrays)
        res = measure({"floor": floor_fn, **grow_fns}, args.reps)
        for name in grow_fns:
            rows.append(
                {
                    "size": f"d{d_model}xL{depth}+{block}",
                    "d_model": d_model,
                    "depth": depth,
                    "block": block,
                    "params": n_params(arrays),
                    "block_params": n_params(arrays),
                    "kind": kind,
                    "op": name,
                    "grown_bytes": nb * (depth + block) // depth,
                    "floor_s": res["floor"]["warm_s"],
                    "floor_all_s": res["floor"]["warm_all_s"],
                    "floor_first_s": res["floor"]["first_s"],
                    **res[name],
                    "ratio": res[name]["warm_s"] / res["floor"]["warm_s"],
                }
            )
        del res
        gc.collect()
    return rows


HEADER = (
    f"{'size':<16}{'params':>10}{'blocks':>10}  {'what':<15}{'op':<15}{'grown GB':>9}"
    f"{'first s':>9}{'warm s':>9}{'floor s':>9}{'ratio':>7}"
)


def fmt_row(r: dict[str, Any]) -> str:
    return (
        f"{r['size']:<16}{r['params'] / 1e6:>9.1f}M{r['block_params'] / 1e6:>9.1f}M  "
        f"{r['kind']:<15}{r['op']:<15}{r['grown_bytes'] / 1e9:>9.3f}{r['first_s']:>9.3f}"
        f"{r['warm_s']:>9.3f}{r['floor_s']:>9.3f}{r['ratio']:>7.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke check)")
    p.add_argument(
        "--max-params",
        type=parse_count,
        default=None,
        help="skip sizes with more parameters than this (e.g. 50M, 2e8)",
    )
    p.add_argument("--reps", type=int, default=None, help="warm calls per function (5; 3 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-opt", action="store_true", help="skip grow_opt_state")
    p.add_argument(
        "--no-layouts",
        action="store_true",
        help="skip the axis-1 parameter dict and haliax Stacked layouts",
    )
    p.add_argument(
        "--mem-budget-gib",
        type=float,
        default=14.0,
        help="skip grow_opt_state where its estimated peak exceeds this",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5

    sizes = QUICK_SIZES if args.quick else SIZES
    if args.max_params is not None:
        sizes = [
            s
            for s in sizes
            if n_params(
                jax.eval_shape(
                    lambda k, s=s: DecoderLM(config_for(*s[:2]), key=k), jax.random.key(0)
                )
            )
            <= args.max_params
        ]
    if not sizes:
        print("no size fits --max-params", file=sys.stderr)
        return 2

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)), "
        f"{platform.machine()}; fp32; {args.reps} warm reps; seed {args.seed}"
    )
    print(HEADER)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for d_model, depth, block in sizes:
        size_rows, skipped = bench_size(d_model, depth, block, args)
        for r in size_rows:
            print(fmt_row(r), flush=True)
        if skipped:
            print(f"  ({skipped})", flush=True)
            notes.append(skipped)
        rows.extend(size_rows)
    rss = peak_rss_gib()
    print(f"peak RSS {rss:.1f} GiB")

    largest_size = max((r["d_model"], r["depth"]) for r in rows)
    at_largest = [r for r in rows if (r["d_model"], r["depth"]) == largest_size]
    largest = max(r["params"] for r in at_largest)
    worst = max(at_largest, key=lambda r: r["ratio"])
    met = worst["ratio"] <= TARGET_RATIO
    kinds = sorted({r["kind"] for r in at_largest})
    verdict = (
        f"target {'MET' if met else 'NOT MET'}: at the largest size "
        f"({at_largest[0]['size']}, {largest / 1e6:.0f}M params; {', '.join(kinds)}) the "
        f"worst warm/floor ratio is {worst['ratio']:.2f} ({worst['kind']} {worst['op']}); "
        f"target <= {TARGET_RATIO}"
    )
    if "grow_opt_state" not in kinds:
        verdict += " (grow_opt_state not measured at this size)"
    print(verdict)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "jax": jax.__version__,
                    "platform": jax.devices()[0].platform,
                    "reps": args.reps,
                    "seed": args.seed,
                    "target_ratio": TARGET_RATIO,
                    "target_met": met,
                    "verdict": verdict,
                    "peak_rss_gib": rss,
                    "notes": notes,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


def entry() -> int:
    """The `stackops-bench-growth` console script (and `python experiments/bench_growth.py`):
    run `main` on the command line's arguments and return the exit status."""
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
