"""The fused CPU attention kernel (stackops_harness.attention) against XLA's attention core."""

import os
import shutil
import warnings
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

from stackops.models import DecoderLM, LMConfig, causal_attention, rope_tables
from stackops_harness import attention as attn_mod
from stackops_harness.attention import (
    KernelUnavailable,
    build_kernel,
    cpu_causal_attention,
    kernel_problem,
    resolve_attention,
)
from stackops_harness.sharding import make_mesh

# Tests that run the kernel need the C++ compiler that builds it; without one, `auto`
# falls back to XLA's attention (tested below) and these are skipped.
needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="no C++ compiler to build the CPU attention kernel",
)


def _qkvw(key, shape):
    return [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(key, 4)]


def _grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


@partial(jax.jit, static_argnums=4)
def _both(q, k, v, w, rotary):
    """Outputs and gradients of the kernel and of XLA's core, in one compiled call."""
    rope = rope_tables(q.shape[1], q.shape[-1]) if rotary else None
    kernel = partial(cpu_causal_attention, rope=rope)
    xla = partial(causal_attention, rope=rope)
    return (
        (kernel(q, k, v), *_grads(kernel, q, k, v, w)),
        (xla(q, k, v), *_grads(xla, q, k, v, w)),
    )


@needs_cxx
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 40),
    h=st.integers(1, 3),
    dh=st.sampled_from([16, 32, 48]),
    rotary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_xla_attention_and_its_gradients(b, t, h, dh, rotary, seed):
    # t covers lengths below, at and across the kernel's 16-row tiles (padding paths).
    got, want = _both(*_qkvw(jax.random.key(seed), (b, t, h, dh)), rotary)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
    for g, r in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4)


@needs_cxx
def test_kernel_on_long_sequences_and_wide_heads():
    # Many tiles per row (T=200 is not a multiple of 16) and the gpu preset's head width.
    got, want = _both(*_qkvw(jax.random.key(7), (2, 200, 2, 64)), True)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@needs_cxx
def test_kernel_is_causal():
    q, k, v, _ = _qkvw(jax.random.key(0), (1, 20, 2, 16))
    changed = v.at[:, 10:].set(100.0)  # the future must not leak into earlier positions
    a, b = cpu_causal_attention(q, k, v), cpu_causal_attention(q, k, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])


@needs_cxx
def test_kernel_under_jit_vmap_and_extra_batch_dims():
    q, k, v, w = _qkvw(jax.random.key(1), (3, 2, 17, 2, 16))
    rope = rope_tables(17, 16)
    kernel = partial(cpu_causal_attention, rope=rope)
    xla = partial(causal_attention, rope=rope)
    flat = (6, 17, 2, 16)
    want = xla(q.reshape(flat), k.reshape(flat), v.reshape(flat))
    np.testing.assert_allclose(kernel(q, k, v).reshape(flat), want, atol=2e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(kernel))(q, k, v).reshape(flat), want, atol=2e-5)
    g = jax.jit(jax.vmap(lambda q, k, v, w: _grads(kernel, q, k, v, w)))(q, k, v, w)
    g_ref = jax.vmap(lambda q, k, v, w: _grads(xla, q, k, v, w))(q, k, v, w)
    for got, ref in zip(g, g_ref):
        np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


@needs_cxx
def test_model_with_kernel_matches_default_attention():
    cfg = LMConfig(d_model=32, n_heads=2, n_layers=2, max_len=24)
    model = DecoderLM(cfg, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    np.testing.assert_allclose(
        jax.jit(lambda m, t: m(t, attention=cpu_causal_attention))(model, tokens),
        model(tokens),
        atol=1e-4,
    )

    def loss(m, attention):
        return jnp.mean(m(tokens, attention=attention) ** 2)

    g1 = eqx.filter_grad(lambda m: loss(m, cpu_causal_attention))(model)
    g2 = eqx.filter_grad(lambda m: loss(m, None))(model)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


@needs_cxx
def test_sharded_kernel_on_eight_devices_matches_one():
    mesh = make_mesh()
    assert mesh.size == 8  # conftest simulates 8 CPU devices
    name, fn = resolve_attention("auto", compute_dtype="float32", head_dim=16, mesh=mesh)
    assert name == "cpu-kernel"
    q, k, v, w = _qkvw(jax.random.key(2), (8, 19, 2, 16))
    rope = rope_tables(19, 16)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    qs, ks, vs = (jax.device_put(x, rows) for x in (q, k, v))
    xla = partial(causal_attention, rope=rope)
    np.testing.assert_allclose(jax.jit(fn)(qs, ks, vs, rope), xla(q, k, v), atol=2e-5)
    sharded = jax.jit(lambda *a: _grads(lambda q, k, v: fn(q, k, v, rope), *a, w))
    for got, want in zip(sharded(qs, ks, vs), _grads(xla, q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


def test_bad_inputs_are_rejected_with_the_fix():
    q = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="compute_dtype='float32'"):
        cpu_causal_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_causal_attention(q[..., :8], q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match="one shape"):
        cpu_causal_attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="rope_tables"):
        cpu_causal_attention(q, q, q, rope_tables(5, 16))


def test_resolve_attention_choices():
    mesh = make_mesh()
    assert resolve_attention("xla", compute_dtype="float32", head_dim=32, mesh=mesh) == (
        "xla",
        None,
    )
    assert resolve_attention("auto", compute_dtype="bfloat16", head_dim=32, mesh=mesh) == (
        "xla",
        None,
    )
    assert resolve_attention("auto", compute_dtype="float32", head_dim=8, mesh=mesh) == (
        "xla",
        None,
    )
    with pytest.raises(ValueError, match="float32"):
        resolve_attention("cpu-kernel", compute_dtype="bfloat16", head_dim=32, mesh=mesh)
    with pytest.raises(ValueError, match="multiple of 16"):
        resolve_attention("cpu-kernel", compute_dtype="float32", head_dim=8, mesh=mesh)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention("flash", compute_dtype="float32", head_dim=32, mesh=mesh)
    assert kernel_problem(compute_dtype="float32", head_dim=32, devices=jax.devices()) is None


def test_build_without_a_compiler_is_a_clear_error_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(KernelUnavailable, match="no-such-compiler-xyz.*attention='xla'"):
        build_kernel(tmp_path)
    monkeypatch.setenv("STACKOPS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(attn_mod, "_loaded", None)  # as in a fresh process
    monkeypatch.setattr(attn_mod, "_failed", None)
    with pytest.warns(UserWarning, match="Falling back"):
        got = resolve_attention("auto", compute_dtype="float32", head_dim=32, mesh=make_mesh())
    assert got == ("xla", None)
    monkeypatch.setenv("CXX", "g++")  # even with a compiler now, the failure is remembered
    with pytest.raises(KernelUnavailable, match="no-such-compiler-xyz"):
        resolve_attention("cpu-kernel", compute_dtype="float32", head_dim=32, mesh=make_mesh())


@needs_cxx
def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CXX", "g++")
    with pytest.raises(KernelUnavailable, match="STACKOPS_KERNEL_CACHE"):
        build_kernel(blocker / "cache")


def test_failed_build_reports_the_compiler_output_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(KernelUnavailable, match="failed"):
        build_kernel(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_cxx
def test_build_is_cached(tmp_path):
    first = build_kernel(tmp_path)
    mtime = first.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_kernel(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
