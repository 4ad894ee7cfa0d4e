"""Attention cores for the harness: XLA's, or a fused causal-attention kernel for XLA CPU.

XLA CPU runs the attention core of the reference model (scores, mask, softmax, weighted
sum and their gradients) as small batched matmuls at about a third of its 2-D matmul rate;
on the `cpu` preset that is 37% of a training step (`experiments/bench_train.py` measures
it). [`cpu_causal_attention`][] is the same function as
[`stackops.models.causal_attention`][] computed by a C++ kernel
(`stackops_harness/kernels/causal_attention.cc`) called through the XLA FFI: one work item per
(batch row, head) on XLA's own thread pool, only the causal triangle of score tiles, the
softmax fused between the products, and a backward pass that recomputes probabilities from
the saved log-sum-exp.

The kernel is compiled on first use with the host's C++ compiler (`$CXX`, else `g++`;
about 3 s) into a cache directory (`$STACKOPS_KERNEL_CACHE`, else
`~/.cache/stackops/kernels`), keyed by the source, the jaxlib version and the CPU, so a
cached build is never used on another kind of machine. Nothing is downloaded.

[`dot_product_causal_attention`][] is the same function again through
`jax.nn.dot_product_attention`: on GPU with bfloat16 (or float16) inputs it runs cuDNN's
fused flash-attention kernel, which never materialises the `B·H·T·T` scores; elsewhere
(CPU, float32) it runs XLA's implementation of that function.

[`resolve_attention`][] turns the config's `attention` field into the function the model
calls: `"xla"` (the `jax.numpy` core), `"cpu-kernel"` (the kernel, or a clear error saying
why it cannot run), `"dot-product"` (`jax.nn.dot_product_attention`, cuDNN where it
applies), or `"auto"`: on CPU the kernel where it applies (float32, a head dimension that
is a multiple of 16, a working compiler), XLA's core otherwise; on GPU `"dot-product"`;
XLA's core on other devices. On a mesh of several devices the kernel runs under
`jax.shard_map`, each device attending over its own rows; `jax.nn.dot_product_attention`
is partitioned by XLA over the batch-sharded rows.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float

from stackops.models import AttentionFn

from .config import ATTENTION_CHOICES
from .sharding import DATA_AXIS

__all__ = [
    "ATTENTION_IMPLS",
    "KernelUnavailable",
    "build_kernel",
    "cpu_causal_attention",
    "cudnn_problem",
    "dot_product_causal_attention",
    "kernel_problem",
    "resolve_attention",
]

ATTENTION_IMPLS = ATTENTION_CHOICES  # one list, kept where the config validates it
SOURCE = Path(__file__).with_name("kernels") / "causal_attention.cc"
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17")
TILE = 16  # the kernel's tile: head dimensions must be a multiple of it

_FWD_TARGET = "stackops_causal_attention_fwd"
_BWD_TARGET = "stackops_causal_attention_bwd"
_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None


class KernelUnavailable(RuntimeError):
    """The CPU attention kernel cannot be built or loaded here (the message says why)."""


_failed: KernelUnavailable | None = None  # set after a failed build: not retried


def _cpu_signature() -> str:
    """Identifies the CPU model and features a `-march=native` build is valid for."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return info


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("STACKOPS_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "stackops" / "kernels"


def build_kernel(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Compile the attention kernel (once per source, jaxlib and CPU) and return its path.

    **Arguments:**

    - `cache_dir`: where the shared library is kept (default `$STACKOPS_KERNEL_CACHE`,
      else `~/.cache/stackops/kernels`).

    **Returns:** the path of the shared library.

    **Raises:** [`KernelUnavailable`][] when no C++ compiler is found (set `$CXX`), the
    cache directory is not writable, or compilation fails (the compiler's message is
    included).

    Concurrent builds (two processes of one run) are safe: each compiles to a temporary
    file and renames it into place.

    !!! Example

        ```python
        path = build_kernel()
        assert path.suffix == ".so" and path.exists()
        ```
    """
    import jaxlib

    cxx = os.environ.get("CXX", "g++")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [source, jaxlib.__version__.encode(), " ".join(CXXFLAGS).encode(), cxx.encode()]
            + [_cpu_signature().encode()]
        )
    ).hexdigest()[:16]
    out_dir = _cache_dir(cache_dir)
    lib = out_dir / f"causal_attention-{key}.so"
    if lib.exists():
        return lib
    compiler = shutil.which(cxx)
    if compiler is None:
        raise KernelUnavailable(
            f"No C++ compiler {cxx!r} on PATH to build the CPU attention kernel: install g++ "
            "(or set $CXX), or set attention='xla'."
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    except OSError as e:
        raise KernelUnavailable(
            f"Cannot write the CPU attention kernel to {out_dir} ({e}): point "
            "$STACKOPS_KERNEL_CACHE at a writable directory, or set attention='xla'."
        ) from e
    os.close(fd)
    cmd = [compiler, *CXXFLAGS, "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    cmd += [str(SOURCE), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(
                f"Building the CPU attention kernel failed ({' '.join(cmd)}):\n"
                f"{result.stderr[-2000:]}\nSet attention='xla' to train without it."
            )
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> None:
    """Build (if needed) and register the kernel's FFI targets, once per process."""
    global _loaded, _failed
    with _lock:
        if _loaded is not None:
            return
        if _failed is not None:  # do not rebuild (seconds) at every stage of a run
            raise _failed
        try:
            path = build_kernel()
            try:
                lib = ctypes.cdll.LoadLibrary(str(path))
            except OSError as e:
                raise KernelUnavailable(f"Cannot load the CPU attention kernel {path}: {e}") from e
        except KernelUnavailable as e:
            _failed = e
            raise
        jax.ffi.register_ffi_target(
            _FWD_TARGET, jax.ffi.pycapsule(lib.StackopsAttnFwd), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            _BWD_TARGET, jax.ffi.pycapsule(lib.StackopsAttnBwd), platform="cpu"
        )
        _loaded = lib


def _check(q: Any, k: Any, v: Any, rope: Any) -> None:
    if q.ndim < 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "cpu_causal_attention: q, k and v must share one shape (..., time, heads, "
            f"head_dim); got {q.shape}, {k.shape}, {v.shape}."
        )
    if any(x.dtype != jnp.float32 for x in (q, k, v)):
        raise ValueError(
            f"cpu_causal_attention computes in float32, got {q.dtype}/{k.dtype}/{v.dtype}: "
            "use compute_dtype='float32' or attention='xla'."
        )
    if q.shape[-1] % TILE:
        raise ValueError(
            f"cpu_causal_attention needs a head dimension that is a multiple of {TILE}, got "
            f"{q.shape[-1]} (d_model / n_heads): change n_heads or use attention='xla'."
        )
    if rope is not None:
        t, half = q.shape[-3], q.shape[-1] // 2
        if len(rope) != 2 or any(x.size != t * half for x in rope):
            raise ValueError(
                "cpu_causal_attention: rope must be the (cos, sin) tables of "
                f"stackops.models.rope_tables({t}, {q.shape[-1]}), each with {t}x{half} "
                f"entries; got shapes {[getattr(x, 'shape', None) for x in rope]}."
            )


def _forward(q: Array, k: Array, v: Array, cos: Array, sin: Array, rotary: int):
    *batch, t, h, _ = q.shape
    out_types = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((*batch, h, t), jnp.float32),  # log-sum-exp per row
    )
    call = jax.ffi.ffi_call(_FWD_TARGET, out_types, vmap_method="expand_dims")
    return call(q, k, v, cos, sin, rotary=np.int32(rotary))


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q: Array, k: Array, v: Array, cos: Array, sin: Array, rotary: int) -> Array:
    return _forward(q, k, v, cos, sin, rotary)[0]


def _attention_fwd(q: Array, k: Array, v: Array, cos: Array, sin: Array, rotary: int):
    out, lse = _forward(q, k, v, cos, sin, rotary)
    return out, (q, k, v, cos, sin, out, lse)


def _attention_bwd(rotary: int, res: tuple[Array, ...], g: Array):
    q, k, v, cos, sin, out, lse = res
    like = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call(_BWD_TARGET, (like, like, like), vmap_method="expand_dims")
    dq, dk, dv = call(q, k, v, cos, sin, out, lse, g.astype(jnp.float32), rotary=np.int32(rotary))
    # The rotary tables are constants of the positions: no gradient flows to them.
    return dq, dk, dv, jnp.zeros_like(cos), jnp.zeros_like(sin)


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_causal_attention(
    q: Float[Array, "*B T H Dh"],
    k: Float[Array, "*B T H Dh"],
    v: Float[Array, "*B T H Dh"],
    rope: tuple[Array, Array] | None = None,
) -> Float[Array, "*B T H Dh"]:
    """[`stackops.models.causal_attention`][] computed by the fused CPU kernel.

    Differentiable (a custom VJP whose backward pass is the kernel too), `jit`- and
    `vmap`-compatible; builds and registers the kernel on first use. Rotary positions are
    applied inside the kernel (while it gathers each head), not as a separate pass.

    **Arguments:**

    - `q`, `k`, `v`: float32 of one shape `(..., time, heads, head_dim)`, `head_dim` a
      multiple of 16. Leading dimensions are batch.
    - `rope`: `None`, or the `(cos, sin)` tables of `stackops.models.rope_tables(time,
      head_dim)` to rotate `q` and `k` by first.

    **Returns:** the attended values, same shape as `q`.

    **Raises:** `ValueError` for other shapes or dtypes (naming the fix),
    [`KernelUnavailable`][] if the kernel cannot be built.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import causal_attention, rope_tables

        q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 8, 2, 16))
        rope = rope_tables(8, 16)
        out = cpu_causal_attention(q, k, v, rope)
        assert jnp.allclose(out, causal_attention(q, k, v, rope), atol=1e-5)
        ```
    """
    _check(q, k, v, rope)
    _load()
    if rope is None:
        dummy = jnp.zeros((1,), jnp.float32)
        return _attention(q, k, v, dummy, dummy, 0)
    half = q.shape[-1] // 2
    cos, sin = (jnp.asarray(x, jnp.float32).reshape(q.shape[-3], half) for x in rope)
    return _attention(q, k, v, cos, sin, 1)


def kernel_problem(*, compute_dtype: str, head_dim: int, devices: Any) -> str | None:
    """Why the CPU kernel does not apply to this run, or `None` if it does (not building it).

    !!! Example

        ```python
        import jax

        assert kernel_problem(compute_dtype="float32", head_dim=32, devices=jax.devices()) is None
        assert "multiple of 16" in kernel_problem(
            compute_dtype="float32", head_dim=8, devices=jax.devices())
        ```
    """
    platforms = sorted({d.platform for d in np.ravel(devices)})
    if platforms != ["cpu"]:
        return f"it runs on CPU devices only, the mesh has {'/'.join(platforms)} devices"
    if compute_dtype != "float32":
        return f"it computes in float32, the config asks for compute_dtype={compute_dtype!r}"
    if head_dim % TILE:
        return f"the head dimension (d_model / n_heads = {head_dim}) is not a multiple of {TILE}"
    return None


CUDNN_DTYPES = ("bfloat16", "float16")  # cuDNN's fused attention takes no float32


def _check_dot_product(q: Any, k: Any, v: Any, rope: Any, implementation: str) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "dot_product_causal_attention: q, k and v must share one shape (batch, time, "
            f"heads, head_dim); got {q.shape}, {k.shape}, {v.shape}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            "dot_product_causal_attention: q, k and v must share one dtype, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}."
        )
    if implementation not in ("xla", "cudnn"):
        raise ValueError(
            f"dot_product_causal_attention: implementation must be 'xla' or 'cudnn', got "
            f"{implementation!r}."
        )
    if implementation == "cudnn" and q.dtype.name not in CUDNN_DTYPES:
        raise ValueError(
            f"dot_product_causal_attention: cuDNN's fused attention takes {CUDNN_DTYPES} "
            f"inputs, got {q.dtype}: use compute_dtype='bfloat16' or implementation='xla'."
        )
    if rope is not None:
        t, half = q.shape[1], q.shape[-1] // 2
        if len(rope) != 2 or any(x.size != t * half for x in rope):
            raise ValueError(
                "dot_product_causal_attention: rope must be the (cos, sin) tables of "
                f"stackops.models.rope_tables({t}, {q.shape[-1]}); got shapes "
                f"{[getattr(x, 'shape', None) for x in rope]}."
            )


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    # The rotary formula of `stackops.models` (the two halves of each head rotated, in the
    # tables' float32, then cast back); the tests check it against `causal_attention`.
    half = x.shape[-1] // 2
    cos, sin = (jnp.reshape(a, (x.shape[1], 1, half)) for a in (cos, sin))
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def dot_product_causal_attention(
    q: Float[Array, "B T H Dh"],
    k: Float[Array, "B T H Dh"],
    v: Float[Array, "B T H Dh"],
    rope: tuple[Array, Array] | None = None,
    *,
    implementation: Literal["xla", "cudnn"] = "xla",
) -> Float[Array, "B T H Dh"]:
    """[`stackops.models.causal_attention`][] through `jax.nn.dot_product_attention`.

    `q` and `k` are rotated by `rope` first (as the reference core does), then
    `jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=...)` attends
    with scale `1 / sqrt(head_dim)` and float32 scores. With `implementation="cudnn"` (a
    GPU, bfloat16 or float16 inputs) this is cuDNN's fused flash-attention kernel, forward
    and backward: the `B·H·T·T` scores are never stored. With `"xla"` it is XLA's
    implementation, available on every device.

    **Arguments:**

    - `q`, `k`, `v`: shape `(batch, time, heads, head_dim)`, one dtype.
    - `rope`: `None`, or the `(cos, sin)` tables of `stackops.models.rope_tables(time,
      head_dim)`.
    - `implementation`: `"xla"` or `"cudnn"`.

    **Returns:** the attended values, same shape and dtype as `q`.

    **Raises:** `ValueError` for mismatched shapes or dtypes, an unknown implementation,
    `"cudnn"` with float32 inputs, or rope tables of the wrong size; `jax.nn`'s own error
    when cuDNN cannot run this shape (see [`cudnn_problem`][]).

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import causal_attention, rope_tables

        q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 8, 2, 16))
        rope = rope_tables(8, 16)
        out = dot_product_causal_attention(q, k, v, rope)
        assert jnp.allclose(out, causal_attention(q, k, v, rope), atol=1e-5)
        ```
    """
    _check_dot_product(q, k, v, rope, implementation)
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _cudnn_trial(head_dim: int, dtype: Any, device: Any) -> str | None:
    """Compile and run a tiny causal attention with its gradient through cuDNN on `device`."""
    shape = (1, 8, 1, head_dim)
    x = jax.device_put(jnp.ones(shape, dtype), device)
    fn = partial(dot_product_causal_attention, implementation="cudnn")
    grad = jax.grad(lambda q: fn(q, q, q).astype(jnp.float32).sum())
    try:
        jax.block_until_ready(jax.jit(grad)(x))
    except Exception as e:  # cuDNN's checks raise NotImplementedError, RuntimeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"cuDNN's fused attention failed a trial run ({type(e).__name__}: {first[:200]})"
    return None


_cudnn_trials: dict[tuple[int, str, str], str | None] = {}


def cudnn_problem(*, compute_dtype: str, head_dim: int, devices: Any) -> str | None:
    """Why cuDNN's fused attention does not apply to this run, or `None` if it does.

    It applies on GPU devices, with `compute_dtype` bfloat16 (or float16) and a head
    dimension that is a multiple of 8; on a GPU a tiny causal attention and its gradient
    are then compiled and run through cuDNN once per (head dimension, dtype, device kind),
    so that a missing cuDNN or an unsupported GPU is found here rather than in the middle
    of a run.

    !!! Example

        ```python
        import jax

        if jax.default_backend() == "cpu":
            assert "GPU" in cudnn_problem(
                compute_dtype="bfloat16", head_dim=64, devices=jax.devices())
        ```
    """
    flat = list(np.ravel(devices))
    platforms = sorted({d.platform for d in flat})
    if platforms != ["gpu"]:
        return f"it runs on GPU devices only, the mesh has {'/'.join(platforms)} devices"
    if compute_dtype not in CUDNN_DTYPES:
        return f"it takes {'/'.join(CUDNN_DTYPES)} inputs, the config asks for {compute_dtype!r}"
    if head_dim % 8:
        return f"the head dimension (d_model / n_heads = {head_dim}) is not a multiple of 8"
    key = (head_dim, compute_dtype, str(flat[0].device_kind))
    if key not in _cudnn_trials:
        _cudnn_trials[key] = _cudnn_trial(head_dim, jnp.dtype(compute_dtype), flat[0])
    return _cudnn_trials[key]


def resolve_attention(
    attention: str, *, compute_dtype: str, head_dim: int, mesh: Mesh
) -> tuple[str, AttentionFn | None]:
    """The attention core for a run: `(name, function)`; the function is `None` for XLA's.

    **Arguments:**

    - `attention`: `"auto"`, `"xla"`, `"cpu-kernel"` or `"dot-product"` (the config's
      `attention` field).
    - `compute_dtype`, `head_dim`: the run's compute dtype and `d_model // n_heads`.
    - `mesh`: the run's mesh; with several devices the kernel runs under `jax.shard_map`
      over the data axis (batch rows split, as the activations are).

    **Returns:** the name actually used (`"xla"`, `"cpu-kernel"`, `"dot-product:cudnn"` or
    `"dot-product:xla"`) and the function to pass as `DecoderLM(..., attention=fn)`.

    `"auto"` is the CPU kernel on CPU devices where it applies, `"dot-product"` on GPU
    devices, XLA's core otherwise. `"dot-product"` uses cuDNN where [`cudnn_problem`][]
    finds none, XLA's implementation of `jax.nn.dot_product_attention` otherwise.

    **Raises:** `ValueError` for an unknown name, or when `"cpu-kernel"` is asked for and does
    not apply (the message says why and how to fix it); [`KernelUnavailable`][] when it is
    asked for and cannot be built. `"auto"` never raises for these: it warns and uses XLA's.

    !!! Example

        ```python
        from stackops_harness.sharding import make_mesh

        name, fn = resolve_attention("xla", compute_dtype="float32", head_dim=32,
                                     mesh=make_mesh())
        assert name == "xla" and fn is None
        ```
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}.")
    if attention == "xla":
        return "xla", None
    platforms = {d.platform for d in np.ravel(mesh.devices)}
    if attention == "dot-product" or (attention == "auto" and platforms == {"gpu"}):
        problem = cudnn_problem(
            compute_dtype=compute_dtype, head_dim=head_dim, devices=mesh.devices
        )
        impl: Literal["xla", "cudnn"] = "xla" if problem is not None else "cudnn"
        if problem is not None and platforms == {"gpu"} and compute_dtype in CUDNN_DTYPES:
            warnings.warn(
                f"cuDNN attention cannot be used: {problem}; XLA's instead.", stacklevel=2
            )
        return f"dot-product:{impl}", partial(dot_product_causal_attention, implementation=impl)
    problem = kernel_problem(compute_dtype=compute_dtype, head_dim=head_dim, devices=mesh.devices)
    if problem is not None:
        if attention == "cpu-kernel":
            raise ValueError(
                f"attention='cpu-kernel' cannot be used: {problem}. Use 'auto' or 'xla'."
            )
        return "xla", None
    try:
        _load()
    except KernelUnavailable as e:
        if attention == "cpu-kernel":
            raise
        warnings.warn(f"{e}\nFalling back to XLA's attention.", stacklevel=2)
        return "xla", None
    if mesh.size == 1:
        return "cpu-kernel", cpu_causal_attention
    spec = PartitionSpec(DATA_AXIS)
    # check_vma=False: the FFI call's results carry no varying-axes annotation, and each
    # device's rows are independent, so there is nothing to check.
    sharded = jax.shard_map(
        cpu_causal_attention,
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec()),  # rope tables replicated
        out_specs=spec,
        check_vma=False,
    )
    return "cpu-kernel", sharded
