"""`Stack`: layers stored with a leading layer axis and run with `jax.lax.scan`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ._tree import check_copyable, stack_leaves, structure_difference

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


def check_same_structure(layers: Sequence[Any], what: str, *, compare_values: bool = True) -> None:
    """Raise a clear error unless all layers have one structure, shapes and dtypes.

    Static data is compared structurally (never with a user's `__eq__`). With
    `compare_values`, non-array leaves must be equal too.
    """
    if len(layers) == 0:
        raise ValueError(f"{what} is empty: there are no layers.")
    for i, layer in enumerate(layers[1:], start=1):
        diff = structure_difference(layers[0], layer, compare_values=compare_values)
        if diff is not None:
            hint = (
                " A Stack keeps one value per non-array leaf for all layers: make a per-layer "
                "value an array (e.g. `jnp.asarray(idx)`) so it is stacked, or make them equal."
                if diff.startswith("non-array leaf")
                else " All layers of one stack must be modules of the same type, shapes and dtypes."
            )
            raise ValueError(
                f"{what}: layer {i} has a different structure from layer 0 ({diff}).{hint}"
            )


def stack(layers: Sequence[M], *, axis: int = 0) -> Any:
    """Stack a list of same-structured modules into a [`stackops.Stack`][].

    Non-array fields must be equal in every layer (a `Stack` keeps one value for all); a
    per-layer value such as a layer index is refused rather than silently dropped: make it
    an array to stack it.

    **Arguments:**

    - `layers`: a non-empty list or tuple of modules with identical structure, shapes and
      dtypes (non-array fields must be equal).
    - `axis`: where the new layer axis goes in every array leaf. `0` (default) returns a
      `Stack`; any other axis returns the stacked pytree itself (e.g. MaxText's layout,
      `axis=1`), which [`stackops.grow`][] grows with the same `axis=`.

    **Returns:** a `Stack` whose array leaves have a leading axis of size `len(layers)`
    (`axis=0`), or the stacked pytree.

    !!! Example

        ```python
        import equinox as eqx, jax
        import stackops as so

        layers = [eqx.nn.Linear(3, 3, key=k) for k in jax.random.split(jax.random.key(0), 4)]
        s = so.stack(layers)
        assert len(s) == 4 and s.layers.weight.shape == (4, 3, 3)
        assert so.unstack(s)[2].weight.shape == (3, 3)
        t = so.stack(layers, axis=1)                     # a Linear with (3, 4, 3) weights
        assert t.weight.shape == (3, 4, 3) and len(so.unstack(t, axis=1)) == 4
        ```
    """
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"stack(layers): expected a list or tuple of modules, got {type(layers).__name__}."
        )
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
        raise ValueError(f"stack(axis=...): expected a non-negative integer, got {axis!r}.")
    check_same_structure(layers, "stack(layers)")
    check_copyable(layers, "stack(layers)")
    dyn = [eqx.filter(layer, eqx.is_array) for layer in layers]
    for path, leaf in jax.tree_util.tree_leaves_with_path(dyn[0]):
        if axis > leaf.ndim:
            raise ValueError(
                f"stack(axis={axis}): leaf {jax.tree_util.keystr(path)} has only {leaf.ndim} "
                "dimensions; the layer axis can go at most after the last one."
            )
    static = eqx.filter(layers[0], eqx.is_array, inverse=True)
    stacked = stack_leaves(dyn, axis)
    if axis == 0:
        return Stack(eqx.combine(stacked, static))
    return eqx.combine(stacked, static)


def unstack(s: Any, *, axis: int = 0) -> list[Any]:
    """Split a [`stackops.Stack`][] (or a pytree with a layer axis) into one module per position.

    Raises for a tied stack, since a list cannot share weights: call
    `stackops.grow(s, stackops.untie())` first if copies are what you want.

    **Arguments:**

    - `s`: a `Stack`, or any pytree whose array leaves share the layer axis `axis`.
    - `axis`: the layer axis of a pytree (a `Stack`'s is always 0).

    **Returns:** a list of layers, each without the layer axis.

    !!! Example

        ```python
        import equinox as eqx, jax
        import stackops as so

        layers = [eqx.nn.Linear(2, 2, key=k) for k in jax.random.split(jax.random.key(0), 3)]
        assert len(so.unstack(so.stack(layers))) == 3
        ```
    """
    if isinstance(s, Stack):
        if axis != 0:
            raise ValueError("unstack(s, axis=...): a Stack's layer axis is always 0; drop `axis`.")
        if s.is_tied:
            raise ValueError(
                "unstack(s): the stack has tied positions (shared weights), which a list cannot "
                "express. Use stackops.grow(s, stackops.untie(), where=lambda x: x) first."
            )
        idx: Sequence[int] = s.order if s.order is not None else range(s.num_layers)
        return [
            jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, s.layers) for i in idx
        ]
    from ._apply import axis_depth

    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"unstack(axis=...): expected an integer, got {axis!r}.")
    if isinstance(s, (list, tuple)) or eqx.is_array(s):
        raise TypeError(
            f"unstack(s): expected a stackops.Stack or a pytree with a layer axis, got "
            f"{type(s).__name__}."
        )
    n = axis_depth(s, axis, argname="s")
    take = lambda a, i: jax.lax.index_in_dim(a, i, axis=axis, keepdims=False)
    return [
        jax.tree.map(lambda a, i=i: take(a, i) if eqx.is_array(a) else a, s) for i in range(n)
    ]


def raw_stack(layers: Any, order: Any = None, depth: int | None = None) -> Stack:
    """A `Stack` built without its checks, for optimizer-state subtrees (leaves may be `None`
    or optax's `MaskedNode`). With no array leaves, `order` records the depth."""
    if order is None and depth is not None and not any(
        eqx.is_array(x) for x in jax.tree.leaves(layers)
    ):
        order = tuple(range(depth))
    obj = object.__new__(Stack)
    object.__setattr__(obj, "layers", layers)
    object.__setattr__(obj, "order", order)
    return obj
