"""The `dot-product` attention choice (`jax.nn.dot_product_attention`) against the jnp core.

On CPU this runs XLA's implementation of `jax.nn.dot_product_attention`; the cuDNN path
needs a GPU (where `cudnn_problem` trial-runs it before a run uses it).
"""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackops.models import DecoderLM, LMConfig, causal_attention, rope_tables
from stackops_harness.attention import (
    cudnn_problem,
    dot_product_causal_attention,
    resolve_attention,
)
from stackops_harness.config import ATTENTION_CHOICES, preset
from stackops_harness.sharding import make_mesh


def _grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


@partial(jax.jit, static_argnums=4)
def _both(q, k, v, w, rotary):
    rope = rope_tables(q.shape[1], q.shape[-1]) if rotary else None
    dpa = partial(dot_product_causal_attention, rope=rope)
    ref = partial(causal_attention, rope=rope)
    return (dpa(q, k, v), *_grads(dpa, q, k, v, w)), (ref(q, k, v), *_grads(ref, q, k, v, w))


@given(  # few distinct shapes, so compilations are reused across examples
    b=st.integers(1, 2),
    t=st.sampled_from([1, 7, 16, 23]),
    h=st.integers(1, 2),
    dh=st.sampled_from([2, 16]),
    rotary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dot_product_matches_the_jnp_core_and_its_gradients(b, t, h, dh, rotary, seed):
    q, k, v, w = (
        jax.random.normal(x, (b, t, h, dh)) for x in jax.random.split(jax.random.key(seed), 4)
    )
    got, want = _both(q, k, v, w, rotary)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    for g, r in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_dot_product_is_causal_and_rotates():
    # Changing a later position must not change earlier outputs (causality); rotary tables
    # must change the result (the rotation is applied, not dropped).
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 6, 2, 8))
    out = dot_product_causal_attention(q, k, v)
    k2, v2 = k.at[:, 4:].add(1.0), v.at[:, 4:].add(1.0)
    np.testing.assert_allclose(
        dot_product_causal_attention(q, k2, v2)[:, :4], out[:, :4], atol=1e-6
    )
    rotated = dot_product_causal_attention(q, k, v, rope_tables(6, 8))
    assert not np.allclose(rotated, out, atol=1e-3)


def test_dot_product_in_bfloat16_is_close_to_the_jnp_core():
    q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 16, 2, 16))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    rope = rope_tables(16, 16)
    got = dot_product_causal_attention(q, k, v, rope)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        got.astype(jnp.float32), causal_attention(q, k, v, rope).astype(jnp.float32), atol=3e-2
    )


def test_model_with_dot_product_attention_matches_default_logits_and_gradients():
    cfg = LMConfig(d_model=32, n_heads=2, n_layers=2, max_len=16)
    model = DecoderLM(cfg, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    name, fn = resolve_attention(
        "dot-product", compute_dtype="float32", head_dim=16, mesh=make_mesh()
    )
    assert name == "dot-product:xla" and fn is not None

    def loss(m, attention):
        return jnp.mean(m(tokens, attention=attention) ** 2)

    l1, g1 = eqx.filter_value_and_grad(loss)(model, fn)
    l0, g0 = eqx.filter_value_and_grad(loss)(model, None)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_dot_product_errors_name_the_fix():
    q = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="one shape"):
        dot_product_causal_attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="one dtype"):
        dot_product_causal_attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="compute_dtype='bfloat16'"):
        dot_product_causal_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="'xla' or 'cudnn'"):
        dot_product_causal_attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match="rope_tables"):
        dot_product_causal_attention(q, q, q, rope_tables(5, 16))


def test_choice_is_valid_config_and_auto_keeps_the_cpu_choice():
    assert "dot-product" in ATTENTION_CHOICES
    assert preset("smoke", attention="dot-product").attention == "dot-product"
    mesh = make_mesh()
    if jax.default_backend() == "cpu":
        # cuDNN needs a GPU: the reason says so, and `dot-product` uses XLA's implementation.
        assert "GPU" in cudnn_problem(compute_dtype="bfloat16", head_dim=64, devices=mesh.devices)
        name, _ = resolve_attention("dot-product", compute_dtype="bfloat16", head_dim=64, mesh=mesh)
        assert name == "dot-product:xla"
        # `auto` on CPU is unchanged: the kernel or XLA's core, never dot-product.
        name, _ = resolve_attention("auto", compute_dtype="float32", head_dim=8, mesh=mesh)
        assert name == "xla"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
def test_on_gpu_auto_uses_cudnn_and_matches_the_jnp_core_in_bfloat16():
    mesh = make_mesh()
    name, fn = resolve_attention("auto", compute_dtype="bfloat16", head_dim=64, mesh=mesh)
    assert name == "dot-product:cudnn", cudnn_problem(
        compute_dtype="bfloat16", head_dim=64, devices=mesh.devices
    )
    q, k, v, w = (
        jax.random.normal(x, (4, 256, 4, 64)) for x in jax.random.split(jax.random.key(0), 4)
    )
    rope = rope_tables(256, 64)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(lambda q, k, v: fn(q, k, v, rope))(*bf)
    want = causal_attention(q, k, v, rope)  # float32 reference
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
    g_got = jax.jit(_grads, static_argnums=0)(partial(fn, rope=rope), *bf, w.astype(jnp.bfloat16))
    g_want = _grads(partial(causal_attention, rope=rope), q, k, v, w)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=0.1, rtol=0.05)
