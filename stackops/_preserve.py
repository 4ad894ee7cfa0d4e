"""Checking that a function-preserving growth preserved the function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["check_preserved"]


def check_preserved(
    model: Any,
    grown: Any,
    *args: Any,
    apply: Callable[..., Any] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> float:
    """Run `model` and `grown` on a probe input and raise unless their outputs agree.

    `preserve=` in [`stackops.grow`][] zeroes the leaves it is told to; whether that makes
    the new layers identities depends on the architecture (pre-LN residual blocks: yes, once
    every residual-branch output term is zeroed, biases included; post-LN blocks: no). Call
    this after a growth that was meant to preserve the function.

    **Arguments:**

    - `model`, `grown`: the model before and after growth.
    - `*args`: the probe input(s), passed to `apply`.
    - `apply`: `(model, *args) -> output` (any pytree of arrays); default `model(*args)`.
    - `rtol`, `atol`: the tolerance, as in `numpy.allclose`.

    **Returns:** the largest absolute difference found (within tolerance).

    **Raises:** `ValueError` naming the output leaf with the largest difference, when the
    outputs differ beyond the tolerance or in structure.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        import stackops as so

        class Res(eqx.Module):
            lin: eqx.nn.Linear

            def __call__(self, x):
                return x + self.lin(jnp.tanh(x))

        blocks = [Res(eqx.nn.Linear(4, 4, key=k)) for k in jax.random.split(jax.random.key(0), 2)]
        run = lambda layers, x: so.stack(layers)(x)
        x = jnp.ones(4)
        good = so.grow(blocks, so.middle_stack(), where=lambda b: b, preserve=lambda b: b.lin)
        so.check_preserved(blocks, good, x, apply=run)          # weight and bias zeroed
        bad = so.grow(blocks, so.middle_stack(), where=lambda b: b,
                      preserve=lambda b: b.lin.weight)          # the bias still adds
        try:
            so.check_preserved(blocks, bad, x, apply=run)
        except ValueError as e:
            print(e)
        ```
    """
    if apply is None:
        if not callable(model):
            raise TypeError(
                "check_preserved: `model` is not callable; pass `apply=lambda m, x: ...` that "
                "runs it."
            )
        apply = lambda m, *a: m(*a)
    before = apply(model, *args)
    after = apply(grown, *args)
    lb, tb = jax.tree_util.tree_flatten_with_path(before)
    la, ta = jax.tree_util.tree_flatten_with_path(after)
    if tb != ta:  # type: ignore[operator]
        raise ValueError(
            f"check_preserved: the outputs differ in structure ({tb} vs {ta}): growth changed "
            "what the model returns."
        )
    worst, where_ = 0.0, "<root>"
    bad = False
    for (path, x), (_, y) in zip(lb, la):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ValueError(
                f"check_preserved: output {jax.tree_util.keystr(path) or '<root>'} has shape "
                f"{x.shape} before growth and {y.shape} after."
            )
        if x.size == 0:
            continue
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        m = float(np.max(d)) if np.all(np.isfinite(d)) else float("inf")
        if not np.allclose(y, x, rtol=rtol, atol=atol, equal_nan=True):
            bad = True
        if m >= worst:
            worst, where_ = m, jax.tree_util.keystr(path) or "<root>"
    if bad:
        raise ValueError(
            f"check_preserved: growth did not preserve the function: output {where_} moved by up "
            f"to {worst:.3g} (rtol={rtol}, atol={atol}). Zeroing makes a new layer an identity "
            "only for pre-LN residual blocks with every residual-branch output term selected "
            "(output projections *and their biases*); post-LN blocks (BERT) are not identities."
        )
    return worst
