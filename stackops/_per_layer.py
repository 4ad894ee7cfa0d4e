"""Per-tensor optimizers on stacked layers: telling them which axes are one layer's matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._apply import get_layers
from ._stack import Stack

__all__ = ["muon_dimension_numbers"]


def muon_dimension_numbers(
    where: Callable[[Any], Any], *, axis: int = 0
) -> Callable[[Any], Any]:
    """`weight_dimension_numbers` for `optax.contrib.muon` that orthogonalise per layer.

    Muon's default rule takes every 2-D leaf as a matrix. On stacked layers (a
    [`stackops.Stack`][] or a pytree with a layer axis) a layer's `(out, in)` matrix is a
    3-D `(L, out, in)` leaf, and its `(d,)` bias or norm scale a 2-D `(L, d)` leaf, so the
    default orthogonalises the biases and none of the matrices. This returns a function of
    the parameters giving, for each leaf under `where`, the two non-layer axes of a
    per-layer matrix (the layer axis becomes a batch axis, so each layer is orthogonalised
    on its own) and `None` (Adam) for per-layer vectors; leaves elsewhere keep the default
    (2-D: a matrix). Pass it as `optax.contrib.muon(..., muon_weight_dimension_numbers=...)`.

    Other per-tensor statistics (LAMB's and LARS's trust ratios, Adafactor's factoring)
    likewise see a stacked leaf as one tensor across all layers; for those, use the list
    layout or a per-layer `optax.multi_transform`.

    **Arguments:**

    - `where`: the layer selector, as for [`stackops.grow`][].
    - `axis`: the layer axis of a pytree with a layer axis (a `Stack`'s is 0).

    **Returns:** a function `params -> tree of MuonDimensionNumbers | None`.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, optax
        import stackops as so

        keys = jax.random.split(jax.random.key(0), 3)
        blocks = so.stack([eqx.nn.Linear(4, 4, key=k) for k in keys])
        params = {"blocks": blocks, "head": jnp.ones((4, 2))}
        dims = so.muon_dimension_numbers(lambda p: p["blocks"])(params)
        assert dims["blocks"].layers.weight == optax.contrib.MuonDimensionNumbers(1, 2)
        assert dims["blocks"].layers.bias is None  # a per-layer vector: Adam
        assert dims["head"] == optax.contrib.MuonDimensionNumbers(0, 1)
        opt = optax.contrib.muon(1e-3, muon_weight_dimension_numbers=so.muon_dimension_numbers(
            lambda p: p["blocks"]))
        state = opt.init(params)
        ```
    """
    if not callable(where):
        raise TypeError(f"`where` must be a function from the params to the layers, got {where!r}.")
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
        raise ValueError(f"`axis` must be a non-negative integer, got {axis!r}.")
    try:  # imported here so that `import stackops` works on optax versions without it
        from optax.contrib import MuonDimensionNumbers
    except ImportError as e:
        raise ImportError(
            "`muon_dimension_numbers` needs an optax with `optax.contrib.MuonDimensionNumbers` "
            "(optax 0.2.8 has it); upgrade optax."
        ) from e

    def dims(params: Any) -> Any:
        container = get_layers(params, where)
        layer_axis = 0 if isinstance(container, Stack) else axis
        stacked = {id(x) for x in jax.tree.leaves(container) if eqx.is_array(x)}

        def one(x: Any) -> Any:
            if not eqx.is_array(x):
                return None
            if id(x) in stacked:
                if x.ndim != 3:
                    return None
                a, b = (k for k in range(3) if k != layer_axis)
                return MuonDimensionNumbers(reduction_axis=a, output_axis=b)
            return MuonDimensionNumbers() if x.ndim == 2 else None

        return jax.tree.map(one, params)

    return dims
