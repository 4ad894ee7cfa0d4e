"""Stack: layout conversions, scanning, routing."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from helpers import make_layers, tree_equal

import stackops as so


def test_stack_unstack_round_trip():
    layers = make_layers(3)
    assert all(tree_equal(a, b) for a, b in zip(so.unstack(so.stack(layers)), layers))


def test_stack_call_equals_running_the_list():
    layers = make_layers(4)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    h = x
    for layer in layers:
        h = layer(h)
    np.testing.assert_allclose(np.asarray(so.stack(layers)(x)), np.asarray(h), rtol=1e-5, atol=1e-6)


def test_tied_stack_runs_its_order():
    layers = make_layers(2)
    s = so.Stack(so.stack(layers).layers, order=(0, 1, 1, 0))
    assert len(s) == 4 and s.num_layers == 2 and s.is_tied
    x = jax.random.normal(jax.random.key(0), (2, 4))
    want = layers[0](layers[1](layers[1](layers[0](x))))
    np.testing.assert_allclose(np.asarray(s(x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert tree_equal(s.layer(2), layers[1])


def test_plan_repr_shows_sources_and_new_layers():
    text = repr(so.middle_stack(block=2).plan(depth=6))
    assert "depth 6 -> 8" in text and "copy(2)  new (inserted)" in text
    text = repr(so.loop_tie(block=1).plan(depth=3))
    assert "tied to layer 1" in text and "3 stored layers" in text


def test_stack_under_vmap_and_jit():
    layers = make_layers(3)
    s = so.stack(layers)
    xs = jax.random.normal(jax.random.key(0), (5, 2, 4))
    out = eqx.filter_jit(jax.vmap(lambda x: s(x)))(xs)
    assert out.shape == (5, 2, 4)
    assert jnp.all(jnp.isfinite(out))
