"""Applying a plan to whatever holds the layers: a list, a `Stack`, a pytree with a layer axis."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._adapters import AbstractLayerAdapter, find_adapter
from ._ops import AbstractGrowth
from ._plan import Plan, resolve
from ._stack import Stack, check_same_structure
from ._tree import check_copyable, is_layer_array, stack_leaves, unsafe_leaves

__all__ = ["grow", "get_layers", "make_plan", "PreserveFn", "LayerView", "view_of", "rebuild"]

T = TypeVar("T")
PreserveFn = Callable[[Any], Any]
Specs = tuple  # tuple[int | tuple[tuple[int, ...], tuple[float, ...]], ...]


def get_layers(tree: Any, where: Callable[[Any], Any], *, argname: str = "where") -> Any:
    """Return `where(tree)`: the container of the layers, whatever its kind."""
    if not callable(where):
        raise TypeError(
            f"`{argname}` must be a function from the model to its layers, e.g. "
            f"`{argname}=lambda m: m.blocks`; got {where!r}."
        )
    try:
        return where(tree)
    except Exception as e:  # noqa: BLE001 -- re-raised with context
        raise ValueError(
            f"`{argname}` failed on the given tree ({type(e).__name__}: {e}). It must point at the "
            f"layer sequence, e.g. `{argname}=lambda m: m.blocks`."
        ) from e


@dataclasses.dataclass
class LayerView:
    """The layers at `where`, in a layout stackops grows: `"list"`, `"stack"` or `"axis"`.

    `list`: `layers` is a list of layers (`seq_type` list or tuple); `stack`: a `Stack`;
    `axis`: a pytree whose array leaves share the layer axis `axis`. `adapter` (if any)
    rebuilds the original container from the grown layout.
    """

    kind: str
    layers: Any
    axis: int = 0
    seq_type: type = list
    adapter: AbstractLayerAdapter | None = None

    @property
    def order(self) -> tuple[int, ...] | None:
        return self.layers.order if self.kind == "stack" else None

    @property
    def depth(self) -> int:
        if self.kind == "axis":
            return axis_depth(self.layers, self.axis)
        return len(self.layers)


def _check_axis(axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`axis` must be an integer (the layer axis of every leaf), got {axis!r}.")
    return int(axis)


def axis_sizes(tree: Any, axis: int) -> list[tuple[str, int | None]]:
    """(path, size along `axis`) of every array leaf; size None where a leaf lacks the axis."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_layer_array(leaf):
            nd = len(leaf.shape)
            ok = -nd <= axis < nd
            out.append((jax.tree_util.keystr(path) or "<root>", leaf.shape[axis] if ok else None))
    return out


def axis_depth(tree: Any, axis: int, *, argname: str = "where", allow_missing: bool = False) -> int:
    """The common size of `axis` over the array leaves of `tree` (a clear error otherwise)."""
    sizes = axis_sizes(tree, axis)
    if allow_missing:
        sizes = [(p, s) for p, s in sizes if s is not None]
    if not sizes:
        raise ValueError(
            f"`{argname}` points at a {type(tree).__name__} with no array leaves: there are no "
            "layers to grow."
        )
    for path, size in sizes:
        if size is None:
            raise ValueError(
                f"`{argname}`: leaf {path} has no axis {axis}; with axis={axis} every array leaf "
                "must carry the layer axis there. Pass the right `axis=`."
            )
    n = sizes[0][1]
    for path, size in sizes:
        if size != n:
            raise ValueError(
                f"`{argname}`: the array leaves disagree on the layer axis (axis={axis}): "
                f"{sizes[0][0]} has {n} layers but {path} has {size}. Point `{argname}` at a "
                "container whose leaves all carry the layer axis, or pass the right `axis=`."
            )
    return n  # type: ignore[return-value]


def view_of(container: Any, *, axis: int = 0, argname: str = "where") -> LayerView:
    """Read the container `where` points at as a `LayerView`."""
    axis = _check_axis(axis)
    adapter = find_adapter(container)
    if adapter is not None:
        unpacked = adapter.unpack(container)
        if isinstance(unpacked, Stack):
            return LayerView("stack", unpacked, adapter=adapter)
        if isinstance(unpacked, (list, tuple)) and unpacked:
            return LayerView("list", list(unpacked), seq_type=list, adapter=adapter)
        raise TypeError(
            f"{type(adapter).__name__}.unpack must return a non-empty list of layers or a "
            f"stackops.Stack, got {type(unpacked).__name__}."
        )
    if isinstance(container, Stack):
        if axis != 0:
            raise ValueError(
                f"axis={axis} was given, but `{argname}` points at a stackops.Stack, whose layer "
                "axis is always 0: drop `axis=`."
            )
        return LayerView("stack", container)
    if isinstance(container, (list, tuple)):
        if len(container) == 0:
            raise ValueError(
                f"`{argname}` points at an empty sequence: there are no layers to grow."
            )
        if axis != 0:
            raise ValueError(
                f"axis={axis} was given, but `{argname}` points at a {type(container).__name__} "
                "of layers, which has no layer axis: drop `axis=`, or point at the stacked pytree."
            )
        return LayerView("list", list(container), seq_type=type(container))
    if is_layer_array(container):
        raise TypeError(
            f"`{argname}` must point at the layers (a list/tuple of modules, a stackops.Stack, or "
            "a pytree whose array leaves share a layer axis), but it returned a single array. "
            f"Point `{argname}` at the container of the layers (e.g. `lambda m: m.blocks`), or "
            "wrap a lone stacked array in stackops.Stack."
        )
    refuse_penzai_named_arrays(container, argname)
    axis_depth(container, axis, argname=argname)
    return LayerView("axis", container, axis=axis)


def refuse_penzai_named_arrays(container: Any, argname: str) -> None:
    """penzai arrays name their axes; a positional "layer axis" of one means nothing.

    Outside a `Sequential`/`LayerStack` (which the adapter handles), a pytree of penzai
    `NamedArray`s -- typically an optax state keyed by parameter labels -- would otherwise
    be grown along whatever axis happens to come first, silently, whenever the sizes agree.
    """
    import sys

    if "penzai" not in sys.modules:
        return
    from penzai import pz

    named = [
        x
        for x in jax.tree.leaves(container, is_leaf=lambda x: isinstance(x, pz.nx.NamedArrayBase))
        if isinstance(x, pz.nx.NamedArrayBase)
    ]
    if named:
        raise TypeError(
            f"`{argname}` points at a {type(container).__name__} of penzai NamedArrays that is "
            "not a penzai Sequential or LayerStack: its arrays have no positional layer axis, "
            f"so there are no layers to grow. Point `{argname}` at the Sequential/LayerStack of "
            "blocks. An optax state keyed by parameter labels cannot be grown: build the state "
            "on `pz.freeze_variables(model)` (it then mirrors the model and grows with it), or "
            "re-initialise it for the grown model."
        )


def rebuild(container: Any, view: LayerView) -> Any:
    """The container for a grown view (the same kind as `container`)."""
    if view.adapter is not None:
        return view.adapter.pack(container, view.layers)
    if view.kind == "list":
        return view.seq_type(view.layers) if view.seq_type is tuple else list(view.layers)
    return view.layers


def make_plan(op: AbstractGrowth | Plan, view: LayerView) -> Plan:
    """The plan of `op` for the layers of `view`, checking a given plan's depth."""
    depth = view.depth
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
    return op.plan(depth, order=view.order)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _out_sharding(x: Any, new_rows: int, axis: int):
    """The sharding for a leaf grown from `x` along `axis`: the same, where it still fits."""
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
        spec = list(tuple(s.spec) + (None,) * (x.ndim - len(s.spec)))
        if spec and spec[axis] is not None:
            axes = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
            size = int(np.prod([s.mesh.shape[a] for a in axes]))
            if new_rows % size:
                # The new depth does not divide over the layer-axis shards: keep every other
                # axis's sharding and replicate the layer axis.
                spec[axis] = None
                return NamedSharding(s.mesh, PartitionSpec(*spec))
        return s
    return s


# Above this many mixed rows, mixes are computed as one batched gather instead of one small
# computation each: compile time then stays flat in the number of mixes.
_MANY_MIXES = 16


def _mix_rows(x: jax.Array, specs: Specs, axis: int) -> jax.Array:
    """Rows of the result along `axis`, one per spec: slices of `x`, then each mix.

    Runs of consecutive source rows are copied as one concatenation of slices (each mix row
    first gets its main source), then the mixes, weighted sums of their source rows
    accumulated in at least float32, overwrite their rows in place. Growth thus costs about
    one copy of the result. With few mixes, each is its own small computation written with a
    dynamic_update_slice, so it rounds the same as the one-row growth of the list layout (a
    mix fused into the concatenation rounds differently, FMA contraction, depending on its
    position). With many mixes, one gather per source slot and one scatter do them all, so
    the program's size does not grow with the number of mixes.
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
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(primary) + 1):
        if i == len(primary) or primary[i] != primary[i - 1] + 1:
            runs.append((primary[start], primary[i - 1] + 1))
            start = i
    if len(runs) > _MANY_MIXES:
        # Many short runs: one gather, whose compile time does not grow with their number.
        out = jnp.take(x, np.asarray(primary, np.int32), axis=axis, unique_indices=False)
    else:
        pieces = [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in runs]
        out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)
    if not mixes:
        return out
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if len(mixes) > _MANY_MIXES:
        width = max(len(sp[0]) for _, sp in mixes)
        rows = np.asarray([r for r, _ in mixes], np.int32)
        mixed = None
        for j in range(width):
            src = np.asarray([sp[0][j] if j < len(sp[0]) else 0 for _, sp in mixes], np.int32)
            w = np.asarray([sp[1][j] if j < len(sp[1]) else 0.0 for _, sp in mixes])
            shape = [1] * x.ndim
            shape[axis] = len(mixes)
            term = jnp.take(x, src, axis=axis).astype(acc_dtype) * jnp.asarray(
                w.reshape(shape), acc_dtype
            )
            mixed = term if mixed is None else mixed + term
        idx = (slice(None),) * axis + (rows,)
        return out.at[idx].set(mixed.astype(x.dtype), unique_indices=True)  # type: ignore[union-attr]
    for r, (srcs, ws) in mixes:
        terms = [
            jax.lax.slice_in_dim(x, s, s + 1, axis=axis).astype(acc_dtype)
            * jnp.asarray(w, acc_dtype)
            for s, w in zip(srcs, ws)
        ]
        mixed = terms[0]
        for term in terms[1:]:
            mixed = mixed + term
        out = jax.lax.dynamic_update_slice_in_dim(out, mixed.astype(x.dtype), r, axis=axis)
    return out


def _zero_rows(layers: Any, preserve: PreserveFn, rows: tuple[int, ...], axis: int) -> Any:
    """Zero rows `rows` (along `axis`) of every array leaf that `preserve` selects."""
    if not rows:
        return layers
    idx = (slice(None),) * axis + (jnp.asarray(rows, jnp.int32),)

    def zero(sub: Any) -> Any:
        return jax.tree.map(
            lambda a: a.at[idx].set(0) if eqx.is_inexact_array(a) else a, sub
        )

    return eqx.tree_at(preserve, layers, replace_fn=zero, is_leaf=lambda x: x is None)


def _grow_dynamic(
    dyn: Any,
    specs: Specs,
    preserve: PreserveFn | None,
    new_rows: tuple[int, ...],
    static: Any,
    axis: int,
):
    out = jax.tree.map(lambda x: _mix_rows(x, specs, axis), dyn)
    if preserve is not None:
        full = eqx.combine(out, static)
        full = _zero_rows(full, preserve, new_rows, axis)
        out = eqx.filter(full, eqx.is_array)
    return out


@functools.lru_cache(maxsize=256)
def _jitted(
    specs: Specs,
    preserve: PreserveFn | None,
    new_rows: tuple[int, ...],
    static_def: Any,
    static_leaves: tuple[Any, ...],
    shardings: Any,
    axis: int,
):
    # The static part is keyed by its treedef and leaves: a dict (a parameter dict's static
    # part) is unhashable itself, and would otherwise recompile on every call.
    static = jax.tree.unflatten(static_def, static_leaves)
    fn = functools.partial(
        _grow_dynamic, specs=specs, preserve=preserve, new_rows=new_rows, static=static, axis=axis
    )
    if shardings is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=shardings)


def grow_stacked_arrays(
    layers: Any,
    specs: Specs,
    *,
    preserve: PreserveFn | None = None,
    new_rows: tuple[int, ...] = (),
    axis: int = 0,
) -> Any:
    """Apply resolved specs along `axis` of every array leaf of `layers`."""
    dyn, static = eqx.partition(layers, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dyn)
    if any(_is_traced(x) for x in leaves):
        out = _grow_dynamic(dyn, specs, preserve, new_rows, static, axis)
    else:
        shardings = None
        if any(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
            shardings = jax.tree.unflatten(
                treedef, [_out_sharding(x, len(specs), axis) for x in leaves]
            )
        static_leaves, static_def = jax.tree.flatten(static)
        try:
            fn = _jitted(
                specs, preserve, new_rows, static_def, tuple(static_leaves), shardings, axis
            )
        except TypeError:  # unhashable static part or selector: run without the cache
            fn = jax.jit(
                functools.partial(
                    _grow_dynamic,
                    specs=specs,
                    preserve=preserve,
                    new_rows=new_rows,
                    static=static,
                    axis=axis,
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
    if not any(eqx.is_inexact_array(x) for x in jax.tree.leaves(sel)):
        raise ValueError(
            "`preserve` must select one or more floating-point arrays of the layer, or modules "
            f"holding them (the residual output projections and their biases); it selected "
            f"{sel!r}."
        )


def _identity_rows(plan: Plan, specs: Specs, order_out: tuple[int, ...]) -> tuple[int, ...]:
    """Stored layers to make identities under `preserve`: those run by inserted positions."""
    inserted = set(plan.inserted)
    rows = sorted({order_out[q] for q in inserted})
    users: dict[int, list[int]] = {}
    for q, i in enumerate(order_out):
        users.setdefault(i, []).append(q)
    for r in rows:
        if isinstance(specs[r], int) or any(q not in inserted for q in users[r]):
            raise ValueError(
                f"preserve: {plan.name} inserts positions that share weights with existing ones "
                "(tied), and a shared layer cannot be an identity at one position and not at "
                "another. Use a copying operator (middle_stack, last_stack, ...) with preserve, "
                "or grow without preserve."
            )
    return tuple(rows)


def _refuse_ties(plan: Plan, order_out: tuple[int, ...], what: str) -> None:
    if len(set(order_out)) != len(order_out):
        raise ValueError(
            f"{plan.name} ties positions (shared weights), which needs a stackops.Stack: "
            f"{what} cannot share them. Convert with `stackops.stack(layers)`, or use an "
            "operator that copies (e.g. middle_stack instead of loop_tie)."
        )


def _check_stacked(tree: Any, argname: str) -> None:
    bad = unsafe_leaves(eqx.filter(tree, eqx.is_array, inverse=True))
    if bad:
        path, leaf = bad[0]
        raise ValueError(
            f"`{argname}`: the stacked layers hold a mutable non-array leaf at {path} "
            f"({type(leaf).__name__}); growth would share it between the old and new layers. "
            "Make it an array or an immutable value, or register an adapter for its container "
            "(stackops.register_adapter)."
        )


def grow_view(
    view: LayerView,
    plan: Plan,
    *,
    preserve: Any = None,
    argname: str = "where",
    checks: bool = True,
) -> LayerView:
    """Apply `plan` to the layers of `view`; returns a view of the same kind.

    `checks=False` (optimizer states) skips the structure and copy-safety checks of layers.
    """
    specs, order_out = resolve(plan, view.order)
    specs_t: Specs = tuple(specs)
    new_rows: tuple[int, ...] = ()
    if preserve is not None and preserve is not False:
        new_rows = _identity_rows(plan, specs_t, order_out)
    if view.kind in ("stack", "axis"):
        tree = view.layers.layers if view.kind == "stack" else view.layers
        if checks:
            _check_stacked(tree, argname)
        if view.kind == "axis":
            _refuse_ties(plan, order_out, f"a pytree with a layer axis (axis={view.axis})")
        pres = _resolve_preserve(preserve, tree)
        if pres is not None:
            _check_preserve(pres, tree)
        new_tree = grow_stacked_arrays(
            tree, specs_t, preserve=pres, new_rows=new_rows, axis=view.axis
        )
        if view.kind == "axis":
            return dataclasses.replace(view, layers=new_tree)
        new_order = None if order_out == tuple(range(len(specs_t))) else order_out
        return dataclasses.replace(view, layers=Stack(new_tree, new_order))

    seq = view.layers
    _refuse_ties(plan, order_out, f"a plain {view.seq_type.__name__} of layers")
    if checks:
        check_same_structure(seq, f"the layers at `{argname}`", compare_values=False)
        check_copyable(seq, f"the layers at `{argname}`")
    pres = _resolve_preserve(preserve, seq[0])
    if pres is not None:
        _check_preserve(pres, seq[0])
    built: list[Any] = []
    for i, sp in enumerate(specs_t):
        if isinstance(sp, int):
            built.append(seq[sp])  # kept: the very same module, bit-identical
            continue
        srcs, ws = sp
        # Build the new layer as a one-row stacked grow over its sources.
        group = [seq[s] for s in srcs]
        # A new layer takes its non-array fields from its main (largest-weight) source, as a
        # copy does.
        main = seq[srcs[int(np.argmax(ws))]]
        static = eqx.filter(main, eqx.is_array, inverse=True)
        if checks:
            check_same_structure(group, f"the sources of new layer {i} at `{argname}`",
                                 compare_values=False)
        dyn = [eqx.filter(g, eqx.is_array) for g in group]
        stacked = stack_leaves(dyn)
        one = grow_stacked_arrays(
            eqx.combine(stacked, static),
            ((tuple(range(len(srcs))), ws),),
            preserve=pres if i in new_rows else None,
            new_rows=(0,),
        )
        built.append(jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, one))
    return dataclasses.replace(view, layers=[built[i] for i in order_out])


def replace_at(where: Callable[[Any], Any], tree: Any, new: Any) -> Any:
    """`tree` with the node `where(tree)` replaced by `new` (one node, whatever its type)."""
    # Wrapped in a 1-tuple so that a container which is itself a sequence or mapping (an
    # `nnx.State`, a tuple of layers) is replaced as one node.
    try:
        return eqx.tree_at(lambda t: (where(t),), tree, (new,))
    except ValueError:
        pass
    # `where` returned a fresh view of the node (`nnx.State.__getitem__` wraps the dict it
    # holds): find the outermost node below the root whose leaves are the very objects of
    # `where(tree)`, and swap it in.
    target = where(tree)
    ids = [id(x) for x in jax.tree.leaves(target)]
    found: list[Any] = []

    def is_target(x: Any) -> bool:
        if x is tree or not ids or found:
            return False
        hit = [id(y) for y in jax.tree.leaves(x)] == ids
        if hit:
            found.append(x)
        return hit

    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_target)
    if not found:
        raise ValueError(
            "`where` must return a node of the tree (e.g. `lambda m: m.blocks`); the node it "
            "returned could not be located in the tree to replace it."
        )
    if isinstance(found[0], dict) and isinstance(new, Mapping) and not isinstance(new, dict):
        new = _plain_mapping(new)
    return jax.tree.unflatten(treedef, [new if x is found[0] else x for x in leaves])


def _plain_mapping(m: Mapping) -> dict:
    return {k: _plain_mapping(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def grow_sequence(seq: Any, plan: Plan, *, preserve: Any = None, argname: str = "where") -> Any:
    """Apply `plan` to a list, tuple or Stack of layers and return the same layout."""
    view = view_of(seq, argname=argname)
    return rebuild(seq, grow_view(view, plan, preserve=preserve, argname=argname))


def grow(
    model: T,
    op: AbstractGrowth | Plan,
    *,
    where: Callable[[T], Any],
    preserve: Any = None,
    axis: int = 0,
    on_depth: Callable[[T, int], T] | None = None,
) -> T:
    """Grow a model in depth: apply a growth operator to the layers that `where` points at.

    Returns a new model; the input is never modified. Kept layers are bit-identical, copies
    equal their sources and share no buffer or mutable object with them, and the layout is
    preserved. Arrays carrying `NamedSharding`s keep them, and growth runs as one jitted
    gather per sharding, so no device ever holds the whole model. Works eagerly and under
    `jax.jit`.

    `where` may point at:

    - a `list`/`tuple` of same-structured modules;
    - a [`stackops.Stack`][];
    - any pytree whose array leaves share a layer axis, at position `axis` of every leaf
      (a Flax linen `nn.scan` parameter dict: `axis=0`; MaxText's scanned params: `axis=1`);
    - a container an adapter handles: haliax `Stacked`, penzai `Sequential`/`LayerStack`,
      Flax NNX `nnx.List` / an `nnx.State` of layers, or one registered with
      [`stackops.register_adapter`][].

    **Arguments:**

    - `model`: any pytree (usually an Equinox module).
    - `op`: a growth operator, e.g. [`stackops.middle_stack`][], or a ready
      [`stackops.Plan`][] for the current depth.
    - `where`: a function from `model` to its layers, e.g. `lambda m: m.blocks` (the
      convention of `eqx.tree_at`).
    - `preserve`: function-preserving mode. `None` (default) copies layers as they are. A
      function from a layer (for stacked layouts: the stacked tree) to what to zero in new
      layers: arrays, modules or tuples of them; every floating-point array leaf selected is
      zeroed, biases included. For a pre-LN residual block `x + f(norm(x))`, zeroing the
      last projection of each residual branch *and its bias* makes `f` return 0, so the new
      layer is an exact identity and the grown model computes the same function. It is not
      an identity for post-LN blocks (`norm(x + f(x))`: the norm still acts) or when any
      residual-branch output term is left unzeroed: check with
      [`stackops.check_preserved`][]. `True` uses the layer type's own
      `residual_out_leaves` method.
    - `axis`: the layer axis of the array leaves, for a pytree with a layer axis (default 0).
    - `on_depth`: optional `(grown_model, new_depth) -> model`, called last, to update
      depth fields stored elsewhere in the model (e.g. a config's `num_layers`).

    **Returns:** the grown model.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        import stackops as so

        keys = jax.random.split(jax.random.key(0), 4)
        layers = so.Stack(eqx.filter_vmap(lambda k: eqx.nn.Linear(8, 8, key=k))(keys))
        grown = so.grow(layers, so.middle_stack(block=2), where=lambda s: s)
        assert len(grown) == 6

        # A MaxText-style parameter dict: the layer axis is axis 1 of every leaf.
        params = {"layers": {"w": jnp.zeros((8, 4, 16)), "b": jnp.zeros((8, 4))}}
        grown = so.grow(params, so.last_stack(block=1), where=lambda p: p["layers"], axis=1)
        assert grown["layers"]["w"].shape == (8, 5, 16)
        ```
    """
    container = get_layers(model, where)
    view = view_of(container, axis=axis)
    plan = make_plan(op, view)
    new_container = rebuild(container, grow_view(view, plan, preserve=preserve))
    out = new_container if container is model else replace_at(where, model, new_container)
    if on_depth is not None:
        if not callable(on_depth):
            raise TypeError(
                "`on_depth` must be a function (grown_model, new_depth) -> model, got "
                f"{on_depth!r}."
            )
        out = on_depth(out, plan.depth_out)
    return out  # type: ignore[return-value]


def plan_for(
    model: Any, op: AbstractGrowth | Plan, *, where: Callable[[Any], Any], axis: int = 0
) -> Plan:
    """The plan that `grow(model, op, where=where, axis=axis)` would apply (nothing changes).

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
    return make_plan(op, view_of(get_layers(model, where), axis=axis))
