"""Applying a plan to whatever holds the layers: a list of modules or a `Stack`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._ops import AbstractGrowth
from ._plan import Plan, resolve
from ._stack import Stack, check_same_structure

__all__ = ["grow", "get_layers", "make_plan", "PreserveFn"]

T = TypeVar("T")
PreserveFn = Callable[[Any], Any]
Specs = tuple  # tuple[int | tuple[tuple[int, ...], tuple[float, ...]], ...]


def get_layers(tree: Any, where: Callable[[Any], Any], *, argname: str = "where") -> Any:
    """Return `where(tree)`, checking that it is a layer sequence (list, tuple or Stack)."""
    if not callable(where):
        raise TypeError(
            f"`{argname}` must be a function from the model to its layers, e.g. "
            f"`{argname}=lambda m: m.blocks`; got {where!r}."
        )
    try:
        seq = where(tree)
    except Exception as e:  # noqa: BLE001 -- re-raised with context
        raise ValueError(
            f"`{argname}` failed on the given tree ({type(e).__name__}: {e}). It must point at the "
            f"layer sequence, e.g. `{argname}=lambda m: m.blocks`."
        ) from e
    if isinstance(seq, Stack):
        return seq
    if isinstance(seq, (list, tuple)):
        if len(seq) == 0:
            raise ValueError(
                f"`{argname}` points at an empty sequence: there are no layers to grow."
            )
        return seq
    raise TypeError(
        f"`{argname}` must point at a layer sequence (a list/tuple of modules or a stackops.Stack),"
        f" but it returned a {type(seq).__name__}. Point it at the layers, e.g. "
        f"`{argname}=lambda m: m.blocks`."
    )


def make_plan(op: AbstractGrowth | Plan, seq: Any) -> Plan:
    """The plan of `op` for the layer sequence `seq`, checking a given plan's depth."""
    order = seq.order if isinstance(seq, Stack) else None
    depth = len(seq)
    if isinstance(op, Plan):
        if op.depth_in != depth:
            raise ValueError(
                f"The plan starts at depth {op.depth_in} but the layers have depth {depth}: make "
                f"the plan with `op.plan(depth={depth})`."
            )
        return op
    if not isinstance(op, AbstractGrowth):
        raise TypeError(
            f"`op` must be a growth operator (e.g. stackops.middle_stack(block=2)) or a Plan, "
            f"got {op!r}."
        )
    return op.plan(depth, order=order)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _out_sharding(x: Any, new_rows: int):
    """The sharding for a leaf grown from `x` along axis 0: the same, where it still fits."""
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
        spec = tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
        if spec and spec[0] is not None:
            axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
            size = int(np.prod([s.mesh.shape[a] for a in axes]))
            if new_rows % size:
                # The new depth does not divide over the layer-axis shards: keep every other
                # axis's sharding and replicate the layer axis.
                return NamedSharding(s.mesh, PartitionSpec(None, *spec[1:]))
        return s
    return s


def _mix_rows(x: jax.Array, specs: Specs) -> jax.Array:
    """Rows of the result, one per spec: slices of `x`, then each mix written in place.

    Runs of consecutive source rows are copied as one concatenation of slices (each mix row
    first gets its main source), then every mix, a weighted sum of its source rows
    accumulated in at least float32, overwrites its row with a dynamic_update_slice, which
    XLA does in place. Growth thus costs about one copy of the result. Each mix is its own
    small computation, so it rounds the same as the one-row growth of the list layout: a mix
    fused into the concatenation rounds differently (FMA contraction) depending on its
    position. (A gather followed by a scatter of the mixed rows cost 2-4x a copy, and with
    unequal weights XLA's CPU reduction took ~40 s for 256 MB.)
    """
    floating = jnp.issubdtype(x.dtype, jnp.inexact)
    primary: list[int] = []
    mixes: list[tuple[int, tuple[tuple[int, ...], tuple[float, ...]]]] = []
    for r, sp in enumerate(specs):
        if isinstance(sp, int):
            primary.append(sp)
            continue
        srcs, ws = sp
        primary.append(srcs[int(np.argmax(ws))])  # a copy (non-float leaves: the main source)
        if floating and not (len(srcs) == 1 and ws[0] == 1.0):
            mixes.append((r, sp))
    pieces: list[jax.Array] = []
    start = 0
    for i in range(1, len(primary) + 1):
        if i == len(primary) or primary[i] != primary[i - 1] + 1:
            pieces.append(jax.lax.slice_in_dim(x, primary[start], primary[i - 1] + 1, axis=0))
            start = i
    out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    for r, (srcs, ws) in mixes:
        terms = [
            jax.lax.slice_in_dim(x, s, s + 1, axis=0).astype(acc_dtype) * jnp.asarray(w, acc_dtype)
            for s, w in zip(srcs, ws)
        ]
        mixed = terms[0]
        for term in terms[1:]:
            mixed = mixed + term
        out = jax.lax.dynamic_update_slice_in_dim(out, mixed.astype(x.dtype), r, axis=0)
    return out


def _zero_rows(layers: Any, preserve: PreserveFn, rows: tuple[int, ...]) -> Any:
    if not rows:
        return layers
    idx = jnp.asarray(rows, jnp.int32)
    return eqx.tree_at(preserve, layers, replace_fn=lambda a: a.at[idx].set(0))


def _grow_dynamic(
    dyn: Any, specs: Specs, preserve: PreserveFn | None, new_rows: tuple[int, ...], static: Any
):
    out = jax.tree.map(lambda x: _mix_rows(x, specs), dyn)
    if preserve is not None:
        full = eqx.combine(out, static)
        full = _zero_rows(full, preserve, new_rows)
        out = eqx.filter(full, eqx.is_array)
    return out


@functools.lru_cache(maxsize=256)
def _jitted(
    specs: Specs,
    preserve: PreserveFn | None,
    new_rows: tuple[int, ...],
    static: Any,
    shardings: Any,
):
    fn = functools.partial(
        _grow_dynamic, specs=specs, preserve=preserve, new_rows=new_rows, static=static
    )
    if shardings is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=shardings)


def grow_stacked_arrays(
    layers: Any, specs: Specs, *, preserve: PreserveFn | None = None, new_rows: tuple[int, ...] = ()
) -> Any:
    """Apply resolved specs along the leading axis of every array leaf of `layers`."""
    dyn, static = eqx.partition(layers, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dyn)
    if any(_is_traced(x) for x in leaves):
        out = _grow_dynamic(dyn, specs, preserve, new_rows, static)
    else:
        shardings = None
        if any(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
            shardings = jax.tree.unflatten(treedef, [_out_sharding(x, len(specs)) for x in leaves])
        try:
            fn = _jitted(specs, preserve, new_rows, static, shardings)
        except TypeError:  # unhashable static part or selector: run without the cache
            fn = jax.jit(
                functools.partial(
                    _grow_dynamic, specs=specs, preserve=preserve, new_rows=new_rows, static=static
                ),
                out_shardings=shardings,
            )
        out = fn(dyn)
    return eqx.combine(out, static)


def _resolve_preserve(preserve: Any, layer: Any) -> PreserveFn | None:
    if preserve is None or preserve is False:
        return None
    if preserve is True:
        fn = getattr(type(layer), "residual_out_leaves", None)
        if fn is None:
            raise ValueError(
                f"preserve=True needs the layer type {type(layer).__name__} to define "
                "`residual_out_leaves(self)` returning the leaves to zero; otherwise pass "
                "`preserve=lambda layer: (layer.attn.out.weight, layer.mlp.down.weight)`."
            )
        return fn  # the class's own function: one jit-cache entry, not a fresh lambda per call
    if callable(preserve):
        return preserve
    raise TypeError(
        f"`preserve` must be None, True, or a function from a layer to the leaves to zero "
        f"(e.g. `lambda layer: (layer.attn.out, layer.mlp.down)`); got {preserve!r}."
    )


def _check_preserve(fn: PreserveFn, layer: Any) -> None:
    try:
        sel = fn(layer)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"`preserve` failed on a layer ({type(e).__name__}: {e}): it must select the leaves "
            "to zero, e.g. `lambda layer: (layer.attn.out, layer.mlp.down)`."
        ) from e
    leaves = sel if isinstance(sel, (list, tuple)) else [sel]
    if not leaves or not all(eqx.is_array(x) for x in leaves):
        raise ValueError(
            "`preserve` must select one or more array leaves of the layer (the residual output "
            f"projections); it selected {sel!r}."
        )


def _identity_rows(plan: Plan, specs: Specs, order_out: tuple[int, ...]) -> tuple[int, ...]:
    """Stored layers to make identities under `preserve`: those run by inserted positions."""
    inserted = set(plan.inserted)
    rows = sorted({order_out[q] for q in inserted})
    for r in rows:
        users = [q for q, i in enumerate(order_out) if i == r]
        if isinstance(specs[r], int) or any(q not in inserted for q in users):
            raise ValueError(
                f"preserve: {plan.name} inserts positions that share weights with existing ones "
                "(tied), and a shared layer cannot be an identity at one position and not at "
                "another. Use a copying operator (middle_stack, last_stack, ...) with preserve, "
                "or grow without preserve."
            )
    return tuple(rows)


def grow_sequence(seq: Any, plan: Plan, *, preserve: Any = None, argname: str = "where") -> Any:
    """Apply `plan` to a layer sequence (list, tuple or Stack) and return the same layout."""
    order = seq.order if isinstance(seq, Stack) else None
    specs, order_out = resolve(plan, order)
    specs_t: Specs = tuple(specs)
    new_rows: tuple[int, ...] = ()
    if preserve is not None and preserve is not False:
        new_rows = _identity_rows(plan, specs_t, order_out)
    if isinstance(seq, Stack):
        pres = _resolve_preserve(preserve, seq.layers)
        if pres is not None:
            _check_preserve(pres, seq.layers)
        new_layers = grow_stacked_arrays(seq.layers, specs_t, preserve=pres, new_rows=new_rows)
        new_order = None if order_out == tuple(range(len(specs_t))) else order_out
        return Stack(new_layers, new_order)

    # list / tuple layout
    if len(set(order_out)) != len(order_out):
        raise ValueError(
            f"{plan.name} ties positions (shared weights), which needs a stackops.Stack: a plain "
            f"{type(seq).__name__} of layers cannot share them. Convert with "
            "`stackops.stack(layers)`"
            ", or use an operator that copies (e.g. middle_stack instead of loop_tie)."
        )
    check_same_structure(list(seq), f"the layers at `{argname}`")
    pres = _resolve_preserve(preserve, seq[0])
    if pres is not None:
        _check_preserve(pres, seq[0])
    built: list[Any] = []
    for i, sp in enumerate(specs_t):
        if isinstance(sp, int) and i in new_rows:  # pragma: no cover - _identity_rows forbids it
            raise AssertionError
        if isinstance(sp, int):
            built.append(seq[sp])  # kept: the very same module, bit-identical
            continue
        srcs, ws = sp
        # Build the new layer as a one-row stacked grow over its sources.
        group = [seq[s] for s in srcs]
        dyn = [eqx.filter(g, eqx.is_array) for g in group]
        static = eqx.filter(group[0], eqx.is_array, inverse=True)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *dyn)
        one = grow_stacked_arrays(
            eqx.combine(stacked, static),
            ((tuple(range(len(srcs))), ws),),
            preserve=pres if i in new_rows else None,
            new_rows=(0,),
        )
        built.append(jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, one))
    out = [built[i] for i in order_out]
    return type(seq)(out) if isinstance(seq, tuple) else out


def grow(
    model: T, op: AbstractGrowth | Plan, *, where: Callable[[T], Any], preserve: Any = None
) -> T:
    """Grow a model in depth: apply a growth operator to the layers that `where` points at.

    Returns a new model; the input is never modified. Kept layers are bit-identical, copies
    equal their sources, and the layout (list, tuple or [`stackops.Stack`][]) is preserved.
    Arrays carrying `NamedSharding`s keep them, and growth runs as one jitted gather per
    sharding, so no device ever holds the whole model. Works eagerly and under `jax.jit`.

    **Arguments:**

    - `model`: any pytree (usually an Equinox module).
    - `op`: a growth operator, e.g. [`stackops.middle_stack`][], or a ready
      [`stackops.Plan`][] for the current depth.
    - `where`: a function from `model` to its layer sequence, e.g. `lambda m: m.blocks`
      (the convention of `eqx.tree_at`).
    - `preserve`: function-preserving mode. `None` (default) copies layers as they are.
      A function from a layer to the leaves to zero in new layers (the residual output
      projections of a pre-LN block, as LLaMA Pro does) makes each new layer an exact
      identity of the residual stream, so the grown model computes the same function.
      `True` uses the layer type's own `residual_out_leaves` method.

    **Returns:** the grown model.

    !!! Example

        ```python
        import equinox as eqx, jax
        import stackops as so

        keys = jax.random.split(jax.random.key(0), 4)
        layers = so.Stack(eqx.filter_vmap(lambda k: eqx.nn.Linear(8, 8, key=k))(keys))
        grown = so.grow(layers, so.middle_stack(block=2), where=lambda s: s)
        assert len(grown) == 6
        ```
    """
    seq = get_layers(model, where)
    plan = make_plan(op, seq)
    new_seq = grow_sequence(seq, plan, preserve=preserve)
    if seq is model:
        return new_seq  # type: ignore[return-value]
    return eqx.tree_at(where, model, new_seq)


def plan_for(model: Any, op: AbstractGrowth | Plan, *, where: Callable[[Any], Any]) -> Plan:
    """The plan that `grow(model, op, where=where)` would apply (nothing is changed).

    !!! Example

        ```python
        import jax
        import stackops as so
        from stackops.models import DecoderLM, LMConfig

        model = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=4), key=jax.random.key(0))
        plan = so.plan_for(model, so.middle_stack(block=2), where=lambda m: m.blocks)
        assert plan.sources() == (0, 1, 0, 1, 2, 3)
        ```
    """
    return make_plan(op, get_layers(model, where))
