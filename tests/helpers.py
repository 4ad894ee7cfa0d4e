"""Small models and comparison helpers shared by the tests."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class ResMLP(eqx.Module):
    """A residual MLP block: `x + relu(x @ w1 + b1) @ w2 + b2` (a second block shape)."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __init__(self, d: int, h: int, *, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.w1 = jax.random.normal(k1, (d, h)) / np.sqrt(d)
        self.b1 = 0.1 * jax.random.normal(k2, (h,))
        self.w2 = jax.random.normal(k3, (h, d)) / np.sqrt(h)
        self.b2 = 0.1 * jax.random.normal(k4, (d,))

    def __call__(self, x):
        return x + jax.nn.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def residual_out_leaves(self):
        return (self.w2, self.b2)


class ListModel(eqx.Module):
    """Layers as a plain list, plus an embedding-like input projection."""

    inp: jax.Array
    blocks: list

    def __call__(self, x):
        h = x @ self.inp
        for b in self.blocks:
            h = b(h)
        return h


class StackModel(eqx.Module):
    """Layers as a `stackops.Stack`."""

    inp: jax.Array
    blocks: object

    def __call__(self, x):
        return self.blocks(x @ self.inp)


def make_layers(n: int, d: int = 4, h: int = 6, seed: int = 0) -> list[ResMLP]:
    keys = jax.random.split(jax.random.key(seed), n)
    return [ResMLP(d, h, key=k) for k in keys]


def make_models(n: int, d: int = 4, h: int = 6, seed: int = 0):
    import stackops as so

    layers = make_layers(n, d, h, seed)
    inp = jax.random.normal(jax.random.key(seed + 1000), (d, d))
    return ListModel(inp, layers), StackModel(inp, so.stack(layers))


def tree_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype and bool(jnp.array_equal(x, y))
        for x, y in zip(la, lb)
    )


def tree_allclose(a, b, rtol=1e-5, atol=1e-6) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(
        x.shape == y.shape and np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(la, lb)
    )
