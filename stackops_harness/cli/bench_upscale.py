"""How fast does a checkpoint grow file to file, next to a plain file copy and to mergekit?

Reading the table
-----------------
The script writes a random Llama-architecture checkpoint of about `--params` parameters
(`config.json` + safetensors shards, `--dtype` bf16 by default; 16 layers, grouped-query
attention, SwiGLU, vocabulary 32000, the width chosen to hit the size), then grows it with
the same operator (`--op`, default SOLAR's two overlapping slices dropping a quarter of the
layers, so the output is 1.5x the layers) in three ways, each in its own process so that
its peak memory is its own:

- `floor`: the physical floor, a plain file copy of the same bytes: the input checkpoint's
  files read once and the output's byte count written, in 16 MiB chunks with Python's
  `readinto`/`write` (what any file-to-file tool must at least do; `cp` of the input alone
  is also shown as `cp input`);
- `stackops`: `stackops.models.upscale_hf(src, dst, op)`, streaming tensor by tensor;
- `stackops (in memory)`: `from_hf`, `stackops.grow`, `to_hf` (holds the input and the
  grown model); `from_hf (read only)` is its first step alone (reading holds one model);
- `mergekit`: mergekit's own `run_merge` on the passthrough config that
  `stackops.to_mergekit` writes for the operator (`--no-mergekit` skips it).

Columns: `s` = wall time of the work inside the process (imports excluded, best of
`--reps`); `x floor` = that over the floor's; `peak MB` = the process's peak resident memory
(`VmHWM`); `above import MB` = that minus the peak of a process that only imports the
same libraries (for the `from_hf` rows, one that also starts JAX's CPU client, as `from_hf`
does; `upscale_hf` never starts it); `x ckpt` = the peak above imports over the input
checkpoint's size. The targets: stackops within 2x of the floor, faster than mergekit,
peak memory below 1.5x the checkpoint. The outputs of stackops and mergekit are compared
tensor by tensor.

All files stay in the page cache (nothing is flushed to disk, for every method alike), so
this measures memory bandwidth and per-tensor overhead, not a disk. On a shared machine
timings vary by 10-30% between runs.

Usage::

    .venv/bin/python experiments/bench_upscale.py --params 100M
    .venv/bin/python experiments/bench_upscale.py --params 1B --dir /scratch   # ~2.2 GB bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LAYERS, VOCAB = 16, 32000


def parse_count(s: str) -> int:
    """`"100M"` -> 100_000_000 (also K, G/B and plain numbers).

    !!! Example

        ```python
        assert parse_count("1B") == parse_count("1e9") == 10**9
        ```
    """
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMGB" else s) * mult)


def llama_shape(params: int) -> dict[str, int]:
    """A Llama-like config (16 layers, head width 64, 4 query heads per key/value head,
    SwiGLU width ~2.7x) whose parameter count is close to `params`.

    !!! Example

        ```python
        cfg = llama_shape(10**9)
        assert 0.9e9 < count_params(cfg) < 1.1e9
        ```
    """
    best = None
    for d in range(128, 8193, 128):
        cfg = _cfg(d)
        err = abs(count_params(cfg) - params)
        if best is None or err < best[0]:
            best = (err, cfg)
    assert best is not None
    return best[1]


def _cfg(d: int) -> dict[str, int]:
    heads = d // 64
    return {
        "hidden_size": d,
        "intermediate_size": int(round(d * 8 / 3 / 64)) * 64,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 4 if heads % 4 == 0 else 1,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
    }


def count_params(cfg: dict[str, int]) -> int:
    """Parameters of a Llama config (untied embeddings and head)."""
    d, ff, h, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads"))
    dh = d // h
    layer = d * (h + 2 * kv) * dh + h * dh * d + 3 * d * ff + 2 * d
    return cfg["num_hidden_layers"] * layer + 2 * cfg["vocab_size"] * d + d


def write_checkpoint(path: Path, shape: dict[str, int], dtype: str, seed: int) -> int:
    """A random Llama checkpoint (config.json + 1 GB shards); returns its bytes."""
    import ml_dtypes
    import numpy as np

    from stackops.models import _safetensors as st

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    d, ff = shape["hidden_size"], shape["intermediate_size"]
    h, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    dh = d // h
    rng = np.random.default_rng(seed)
    # Drawing a billion normals takes a minute here; windows of one random pool at random
    # offsets are as good for timing a copy, and every tensor still differs.
    pool = (0.02 * rng.standard_normal(2**22, np.float32)).astype(np_dtype)

    def rand(*s: int) -> Any:
        def make() -> Any:
            n = int(np.prod(s))
            start = int(rng.integers(0, pool.size))
            return np.resize(np.roll(pool, -start), n).reshape(s)

        return make

    def ones(*s: int) -> Any:
        return lambda: np.ones(s, np_dtype)

    shapes: list[tuple[str, tuple[int, ...], Any]] = [
        ("model.embed_tokens.weight", (VOCAB, d), rand)]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,), ones),
            (p + "self_attn.q_proj.weight", (h * dh, d), rand),
            (p + "self_attn.k_proj.weight", (kv * dh, d), rand),
            (p + "self_attn.v_proj.weight", (kv * dh, d), rand),
            (p + "self_attn.o_proj.weight", (d, h * dh), rand),
            (p + "post_attention_layernorm.weight", (d,), ones),
            (p + "mlp.gate_proj.weight", (ff, d), rand),
            (p + "mlp.up_proj.weight", (ff, d), rand),
            (p + "mlp.down_proj.weight", (d, ff), rand),
        ]
    shapes += [("model.norm.weight", (d,), ones), ("lm_head.weight", (VOCAB, d), rand)]
    entries = [st.Entry(n, s, np_dtype, f(*s)) for n, s, f in shapes]
    path.mkdir(parents=True, exist_ok=True)
    st.write_checkpoint(path, entries, max_shard_size=10**9)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False, "mlp_bias": False, "head_dim": dh, "dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2, **shape,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sum(e.nbytes for e in entries)


# --------------------------------------------------------------------------- workers


def _floor(src: Path, dst: Path, out_bytes: int) -> None:
    """Read every input byte once, write `out_bytes` bytes: a plain chunked file copy."""
    dst.mkdir(parents=True, exist_ok=True)
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    left = out_bytes
    with open(dst / "copy.bin", "wb") as out:
        inputs = sorted(src.glob("*.safetensors"))
        while left > 0:
            for f in inputs:
                with open(f, "rb") as inp:
                    while left > 0 and (n := inp.readinto(buf)):
                        n = min(n, left)
                        out.write(view[:n])
                        left -= n


def _mergekit_config(src: Path, op_text: str) -> dict[str, Any]:
    import stackops as so
    from stackops_harness.cli.upscale import parse_op

    depth = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    return so.to_mergekit(parse_op(op_text), depth, model=str(src))


def worker(kind: str, src: Path, dst: Path, op_text: str, out_bytes: int) -> float:
    """Run one method once (imports done first) and return its seconds."""
    if kind in ("import-stackops", "import-jax", "import-mergekit"):
        if kind in ("import-stackops", "import-jax"):
            import jax

            import stackops.models  # noqa: F401

            if kind == "import-jax":
                jax.numpy.zeros(1).block_until_ready()  # the XLA client, as from_hf starts it
        else:
            import mergekit.merge  # noqa: F401
        return 0.0
    if kind == "from_hf":
        import jax

        from stackops.models import from_hf

        t0 = time.perf_counter()
        jax.block_until_ready(from_hf(src))
        return time.perf_counter() - t0
    if kind in ("stackops", "stackops-memory"):
        import stackops as so
        from stackops.models import from_hf, to_hf, upscale_hf
        from stackops_harness.cli.upscale import parse_op

        op = parse_op(op_text)
        t0 = time.perf_counter()
        if kind == "stackops":
            upscale_hf(src, dst, op, overwrite=True)
        else:
            grown = so.grow(from_hf(src), op, where=lambda m: m.blocks)
            to_hf(grown, dst, like=src, overwrite=True)
        return time.perf_counter() - t0
    if kind == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        conf = MergeConfiguration.model_validate(_mergekit_config(src, op_text))
        t0 = time.perf_counter()
        run_merge(conf, str(dst), MergeOptions(copy_tokenizer=False, quiet=True,
                                               write_model_card=False))
        return time.perf_counter() - t0
    if kind == "floor":
        t0 = time.perf_counter()
        _floor(src, dst, out_bytes)
        return time.perf_counter() - t0
    if kind == "cp":
        t0 = time.perf_counter()
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.glob("*.safetensors")):
            shutil.copyfile(f, dst / f.name)
        return time.perf_counter() - t0
    raise ValueError(kind)


def _run_worker(kind: str, src: Path, dst: Path, op_text: str, out_bytes: int) -> dict[str, Any]:
    if dst.exists():
        shutil.rmtree(dst)
    cmd = [sys.executable, "-m", "stackops_harness.cli.bench_upscale", "--worker", kind,
           str(src), str(dst), op_text, str(out_bytes)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    import numpy as np

    from stackops.models._safetensors import Reader

    with Reader(a) as ra, Reader(b) as rb:
        if ra.tensors.keys() != rb.tensors.keys():
            return False
        return all(np.array_equal(ra.get(k), rb.get(k)) for k in ra.tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=parse_count, default=parse_count("100M"),
                   help="checkpoint size in parameters (100M; the reference size is 1B)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--op", default=None, help="operator (default: solar(drop=LAYERS//4))")
    p.add_argument("--reps", type=int, default=2, help="runs per method (best is reported)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    p.add_argument("--no-memory-path", action="store_true",
                   help="skip the in-memory from_hf/grow/to_hf path")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return _bench(p.parse_args(argv))


def _bench(args: argparse.Namespace) -> int:
    op_text = args.op or f"solar(drop={LAYERS // 4})"
    shape = llama_shape(args.params)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-upscale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    src = scratch / "src"
    try:
        t0 = time.perf_counter()
        in_bytes = write_checkpoint(src, shape, args.dtype, seed=0)
        from stackops_harness.cli.upscale import parse_op

        plan = parse_op(op_text).plan(LAYERS)
        from stackops.models._safetensors import Reader

        with Reader(src) as reader:
            layer_bytes = sum(t.nbytes for n, t in reader.tensors.items()
                              if n.startswith("model.layers."))
        out_bytes = in_bytes + layer_bytes * (plan.depth_out - LAYERS) // LAYERS
        print(f"checkpoint: {count_params(shape) / 1e6:.0f}M parameters, {args.dtype}, "
              f"{in_bytes / 1e6:.0f} MB in {len(list(src.glob('*.safetensors')))} file(s) "
              f"(written in {time.perf_counter() - t0:.1f} s); {op_text}: {LAYERS} -> "
              f"{plan.depth_out} layers, {out_bytes / 1e6:.0f} MB out")
        kinds = ["floor", "cp", "stackops"]
        if not args.no_memory_path:
            kinds += ["from_hf", "stackops-memory"]
        if not args.no_mergekit:
            kinds.append("mergekit")
        results: dict[str, dict[str, Any]] = {}
        for rep in range(args.reps):
            for kind in kinds:  # interleaved, so machine noise hits every method alike
                r = _run_worker(kind, src, scratch / kind, op_text, out_bytes)
                best = results.get(kind)
                if best is None or r["seconds"] < best["seconds"]:
                    results[kind] = {**r, "peak_mb": max(r["peak_mb"], (best or r)["peak_mb"])}
                elif r["peak_mb"] > best["peak_mb"]:
                    best["peak_mb"] = r["peak_mb"]
            del rep
        base = {k: _run_worker(f"import-{k}", src, scratch / "imp", op_text, 0)["peak_mb"]
                for k in (["stackops", "jax"] + ([] if args.no_mergekit else ["mergekit"]))}
        same = None if args.no_mergekit else _same_tensors(scratch / "stackops",
                                                            scratch / "mergekit")
        _report(results, base, in_bytes, same, args)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _report(results: dict[str, dict[str, Any]], base: dict[str, float], in_bytes: int,
            same: bool | None, args: argparse.Namespace) -> None:
    floor = results["floor"]["seconds"]
    names = {"floor": "floor (read in, write out)", "cp": "cp input", "stackops": "stackops",
             "stackops-memory": "stackops (in memory)", "from_hf": "from_hf (read only)",
             "mergekit": "mergekit"}
    print(f"{'method':<28}{'s':>8}{'x floor':>9}{'peak MB':>10}{'above import MB':>17}"
          f"{'x ckpt':>8}")
    rows = []
    for kind, r in results.items():
        # upscale_hf never starts JAX's client; from_hf does (its baseline includes it).
        b = base[{"mergekit": "mergekit", "stackops": "stackops"}.get(kind, "jax")] \
            if kind not in ("floor", "cp") else 0.0
        above = r["peak_mb"] - b if kind not in ("floor", "cp") else float("nan")
        x_ckpt = above * 2**20 / in_bytes
        print(f"{names[kind]:<28}{r['seconds']:>8.2f}{r['seconds'] / floor:>9.2f}"
              f"{r['peak_mb']:>10.0f}{above:>17.0f}{x_ckpt:>8.2f}")
        rows.append({"method": kind, **r, "above_import_mb": above, "x_floor": r["seconds"] / floor,
                     "x_ckpt": x_ckpt})
    print(f"import-only peak MB: {base}")
    s = results["stackops"]
    verdict = [f"stackops/floor = {s['seconds'] / floor:.2f} (target <= 2)"]
    if "mergekit" in results:
        verdict.append(f"mergekit/stackops = {results['mergekit']['seconds'] / s['seconds']:.2f}"
                       " (target > 1)")
    verdict.append(f"stackops peak above imports / checkpoint = "
                   f"{(s['peak_mb'] - base['stackops']) * 2**20 / in_bytes:.2f} (target < 1.5)")
    if same is not None:
        verdict.append(f"stackops and mergekit outputs identical: {same}")
    print("; ".join(verdict))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "import_peak_mb": base,
                                              "checkpoint_bytes": in_bytes,
                                              "identical": same}, indent=2))


def _vm_hwm_mb() -> float:
    """This process's peak resident memory. `VmHWM` belongs to the process's own address
    space, which starts fresh at exec; `ru_maxrss` would also count the forked parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _worker_main(argv: list[str]) -> int:
    kind, src, dst, op_text, out_bytes = argv
    seconds = worker(kind, Path(src), Path(dst), op_text, int(out_bytes))
    print(json.dumps({"seconds": seconds, "peak_mb": _vm_hwm_mb()}))
    return 0


def entry() -> int:
    """The `stackops-bench-upscale` console script (and `python experiments/bench_upscale.py`)."""
    argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(entry())
