"""`Stack`: layers stored with a leading layer axis and run with `jax.lax.scan`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["Stack", "stack", "unstack"]

M = TypeVar("M")
C = TypeVar("C")


def _leading_sizes(layers: Any) -> list[tuple[str, int | None]]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(layers):
        if eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct):
            size = leaf.shape[0] if leaf.ndim >= 1 else None
            out.append((jax.tree_util.keystr(path), size))
    return out


class Stack(eqx.Module, Generic[M]):
    """A sequence of same-structured layers stored as one module with a leading layer axis.

    `layers` is a module whose array leaves carry a leading axis of size `num_layers` (the
    scan-over-layers idiom: one compilation whatever the depth). `order` routes positions to
    stored layers: position `p` runs stored layer `order[p]`; `None` means position `p` runs
    layer `p`. Positions that share a stored layer are *tied*: the gradient of that layer is
    the sum over its positions.

    Build one with [`stackops.stack`][] from a list of modules, or directly from a module
    made with `eqx.filter_vmap`.

    **Arguments:**

    - `layers`: the stacked module.
    - `order`: optional tuple of stored-layer indices, one per position; every stored layer
      must be used.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        import stackops as so

        keys = jax.random.split(jax.random.key(0), 3)
        mlps = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys)
        s = so.Stack(mlps)
        assert len(s) == 3
        y = s.scan(lambda h, layer: jnp.tanh(layer(h)), jnp.ones(4))
        ```
    """

    layers: M
    order: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        sizes = _leading_sizes(self.layers)
        if not sizes:
            raise ValueError("Stack(layers=...): `layers` has no array leaves to stack.")
        bad = [(p, s) for p, s in sizes if s is None]
        if bad:
            raise ValueError(
                f"Stack(layers=...): leaf {bad[0][0] or '<root>'} is a scalar; every array leaf "
                "needs a leading layer axis (build stacks with stackops.stack)."
            )
        n = sizes[0][1]
        for path, size in sizes:
            if size != n:
                raise ValueError(
                    "Stack(layers=...): leaves disagree on the layer axis: "
                    f"{sizes[0][0] or '<root>'}"
                    f" has {n} layers but {path or '<root>'} has {size}. Every array leaf must have"
                    " the same leading size."
                )
        if self.order is not None:
            order = tuple(self.order)
            if not order:
                raise ValueError(
                    "Stack(order=...): `order` is empty; it needs one entry per position."
                )
            if any((not isinstance(i, int)) or not 0 <= i < n for i in order):  # type: ignore[operator]
                raise ValueError(
                    "Stack(order=...): entries must be stored-layer indices in "
                    f"0..{n - 1}, got {order}."
                )
            if set(order) != set(range(n)):  # type: ignore[arg-type]
                unused = sorted(set(range(n)) - set(order))  # type: ignore[arg-type]
                raise ValueError(
                    f"Stack(order=...): stored layers {unused} are never run; drop them."
                )

    @property
    def num_layers(self) -> int:
        """Number of stored layers (the leading axis)."""
        return _leading_sizes(self.layers)[0][1]  # type: ignore[return-value]

    @property
    def is_tied(self) -> bool:
        """Whether some positions share a stored layer."""
        return self.order is not None and len(set(self.order)) != len(self.order)

    def __len__(self) -> int:
        """Number of positions (layers run in sequence)."""
        return len(self.order) if self.order is not None else self.num_layers

    def scan(self, fn: Callable[[C, M], C], init: C, *, unroll: int | bool = 1) -> C:
        """Run `carry = fn(carry, layer)` for each position in order, with `jax.lax.scan`.

        **Arguments:**

        - `fn`: `(carry, layer) -> carry`, where `layer` is one layer (no layer axis).
        - `init`: the initial carry (e.g. the residual stream).
        - `unroll`: passed to `jax.lax.scan`.

        **Returns:** the final carry.
        """
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        if self.order is None or list(self.order) == list(range(self.num_layers)):

            def body(carry, layer_dyn):
                return fn(carry, eqx.combine(layer_dyn, static)), None

            out, _ = jax.lax.scan(body, init, dynamic, unroll=unroll)
            return out

        def body_tied(carry, index):
            # Index the stored layer inside the loop: tied positions never materialise
            # copies, and the gradient scatter-adds into the one stored layer.
            layer_dyn = jax.tree.map(
                lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), dynamic
            )
            return fn(carry, eqx.combine(layer_dyn, static)), None

        out, _ = jax.lax.scan(body_tied, init, jnp.asarray(self.order, jnp.int32), unroll=unroll)
        return out

    def __call__(self, x, *args, unroll: int | bool = 1, **kwargs):
        """Run `x = layer(x, *args, **kwargs)` for every position in order."""
        return self.scan(lambda h, layer: layer(h, *args, **kwargs), x, unroll=unroll)  # type: ignore[operator]

    def layer(self, index: int) -> M:
        """The layer run at position `index` (without the layer axis)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"Stack.layer({index}): the stack has {len(self)} positions.")
        stored = self.order[index] if self.order is not None else index % self.num_layers
        return jax.tree.map(lambda a: a[stored] if eqx.is_array(a) else a, self.layers)


def _describe_mismatch(a: Any, b: Any) -> str:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:  # type: ignore[operator]
        return f"tree structures differ:\n  {ta}\n  vs\n  {tb}"
    for (p, x), (_, y) in zip(la, lb):
        sx = getattr(x, "shape", None), getattr(x, "dtype", None)
        sy = getattr(y, "shape", None), getattr(y, "dtype", None)
        if sx != sy:
            return f"leaf {jax.tree_util.keystr(p)} has shape/dtype {sx} vs {sy}"
    return "static fields differ"


def check_same_structure(layers: Sequence[Any], what: str) -> None:
    """Raise a clear error unless all layers have one tree structure, shapes and dtypes."""
    if len(layers) == 0:
        raise ValueError(f"{what} is empty: there are no layers.")
    ref_d, ref_s = eqx.partition(layers[0], eqx.is_array)
    ref_shapes = jax.tree.map(lambda a: (a.shape, a.dtype), ref_d)
    for i, layer in enumerate(layers[1:], start=1):
        d, s = eqx.partition(layer, eqx.is_array)
        ok = jax.tree.structure(d) == jax.tree.structure(ref_d) and jax.tree.structure(
            s
        ) == jax.tree.structure(ref_s)
        if ok:
            ok = jax.tree.map(lambda a: (a.shape, a.dtype), d) == ref_shapes
        if not ok:
            raise ValueError(
                f"{what}: layer {i} has a different structure from layer 0 "
                f"({_describe_mismatch(layers[0], layer)}). All layers of one stack must be "
                "modules of the same type, shapes and dtypes."
            )


def stack(layers: Sequence[M]) -> Stack[M]:
    """Stack a list of same-structured modules into a [`stackops.Stack`][].

    **Arguments:**

    - `layers`: a non-empty list or tuple of modules with identical structure, shapes and
      dtypes (non-array fields must be equal).

    **Returns:** a `Stack` whose array leaves have a leading axis of size `len(layers)`.

    !!! Example

        ```python
        import equinox as eqx, jax
        import stackops as so

        layers = [eqx.nn.Linear(3, 3, key=k) for k in jax.random.split(jax.random.key(0), 4)]
        s = so.stack(layers)
        assert len(s) == 4 and s.layers.weight.shape == (4, 3, 3)
        assert so.unstack(s)[2].weight.shape == (3, 3)
        ```
    """
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"stack(layers): expected a list or tuple of modules, got {type(layers).__name__}."
        )
    check_same_structure(layers, "stack(layers)")
    dyn = [eqx.filter(layer, eqx.is_array) for layer in layers]
    static = eqx.filter(layers[0], eqx.is_array, inverse=True)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *dyn)
    return Stack(eqx.combine(stacked, static))


def unstack(s: Stack[M]) -> list[M]:
    """Split a [`stackops.Stack`][] into a list of modules, one per position.

    Raises for a tied stack, since a list cannot share weights: call
    `stackops.grow(s, stackops.untie())` first if copies are what you want.

    !!! Example

        ```python
        import equinox as eqx, jax
        import stackops as so

        layers = [eqx.nn.Linear(2, 2, key=k) for k in jax.random.split(jax.random.key(0), 3)]
        assert len(so.unstack(so.stack(layers))) == 3
        ```
    """
    if not isinstance(s, Stack):
        raise TypeError(f"unstack(s): expected a stackops.Stack, got {type(s).__name__}.")
    if s.is_tied:
        raise ValueError(
            "unstack(s): the stack has tied positions (shared weights), which a list cannot "
            "express. Use stackops.grow(s, stackops.untie(), where=lambda x: x) first."
        )
    idx = s.order if s.order is not None else range(s.num_layers)
    return [jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, s.layers) for i in idx]
