"""Growing an optax optimizer state with the same plan as the parameters."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._apply import (
    LayerView,
    get_layers,
    grow,
    grow_stacked_arrays,
    grow_view,
    make_plan,
    rebuild,
    refuse_penzai_named_arrays,
    replace_at,
    view_of,
)
from ._ops import AbstractGrowth
from ._plan import Plan, resolve
from ._stack import Stack
from ._stack import raw_stack as _raw_stack
from ._tree import is_layer_array

__all__ = ["grow_opt_state"]

Policy = Literal["copy", "zero", "init"]


class _Placeholder:
    """Stands in for the parameters when asking `optimizer.init` where params-shaped trees are."""


jax.tree_util.register_pytree_node(_Placeholder, lambda p: ((), None), lambda _, __: _Placeholder())


def _abstract(tree: Any) -> list[tuple[tuple[int, ...], Any]]:
    """The (shape, dtype) of every leaf, in order (compare together with the tree structure)."""
    return [(tuple(x.shape), x.dtype) for x in jax.tree.leaves(tree)]


def _candidate_params(params: Any) -> list[Any]:
    cands = [params]
    for f in (eqx.is_inexact_array, eqx.is_array):
        try:
            cands.append(eqx.filter(params, f))
        except Exception:  # noqa: BLE001
            pass
    return cands


def _find_by_params(opt_state: Any, params: Any) -> tuple[list[bool], Any, list[Any]]:
    """Mark the subtrees of `opt_state` shaped like `params` (down to params' leaves).

    A subtree matches when it has the type of `params` and its structure down to the leaves
    of `params` is the same; what sits at a leaf position may be an array of any shape, a
    `None` or optax's `MaskedNode`. This needs no call to `optimizer.init`, so label and mask
    functions that read the model, and optimizers that cannot init a placeholder, work.
    """
    ref_def = jax.tree.structure(params)
    ptype = type(params)

    def matches(x: Any) -> bool:
        if type(x) is not ptype:
            return False
        try:
            ref_def.flatten_up_to(x)
        except (ValueError, TypeError):
            return False
        return True

    leaves, treedef = jax.tree.flatten(opt_state, is_leaf=matches)
    return [matches(x) for x in leaves], treedef, leaves


def _find_by_placeholder(optimizer: Any, opt_state: Any) -> tuple[list[bool], Any, list[Any]]:
    try:
        with_placeholders = optimizer.init(_Placeholder())
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            "grow_opt_state could not locate the parameter-shaped parts of the optimizer state: "
            f"`optimizer.init` failed on a placeholder ({type(e).__name__}: {e}). Pass "
            "`params=` (the parameters or model before growth): the state is then searched for "
            "subtrees shaped like them."
        ) from e
    is_ph = lambda x: isinstance(x, _Placeholder)
    ph_leaves, ph_def = jax.tree.flatten(with_placeholders, is_leaf=is_ph)
    try:
        subtrees = ph_def.flatten_up_to(opt_state)
    except (ValueError, TypeError) as e:
        short = lambda t: (lambda r: r if len(r) < 160 else r[:157] + "...")(str(t))
        raise ValueError(
            "grow_opt_state: could not map `opt_state`: it does not have the structure that "
            f"`optimizer.init` makes on a placeholder (expected {short(ph_def)}, got "
            f"{short(jax.tree.structure(opt_state))}). Pass `params=` (the parameters before "
            "growth) so the state is searched for subtrees shaped like them, and the optimizer "
            "that made the state."
        ) from e
    return [is_ph(p) for p in ph_leaves], ph_def, subtrees


def _match_params(optimizer: Any, opt_state: Any, params: Any) -> tuple[Any, str | None]:
    """The form of `params` that `optimizer.init` turns into a state shaped like `opt_state`.

    Returns `(form, None)`, or `(None, reason)` when no form matches; `reason` is `None` too
    when `optimizer.init` could not run on the parameters at all (nothing to compare).
    """
    want = jax.tree.structure(opt_state)
    want_shapes = _abstract(opt_state)
    first_diff = None
    ran = False
    for cand in _candidate_params(params):
        try:
            got = jax.eval_shape(optimizer.init, cand)
        except Exception:  # noqa: BLE001
            continue
        ran = True
        if jax.tree.structure(got) == want and _abstract(got) == want_shapes:
            return cand, None
        if first_diff is None:
            if jax.tree.structure(got) != want:
                first_diff = "the state's tree structure differs from optimizer.init(params)'s"
            else:
                for (p, a), b in zip(
                    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(opt_state)
                ):
                    if (tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
                        first_diff = (
                            f"state leaf {jax.tree_util.keystr(p)} is {tuple(b.shape)} "
                            f"{b.dtype}, but optimizer.init(params) gives "
                            f"{tuple(a.shape)} {a.dtype}"
                        )
                        break
    return None, (first_diff if ran else None)


def grow_opt_state(
    optimizer: optax.GradientTransformation,
    opt_state: optax.OptState,
    op: AbstractGrowth | Plan,
    *,
    where: Callable[[Any], Any],
    params: Any = None,
    policy: Policy = "copy",
    axis: int = 0,
    new_optimizer: optax.GradientTransformation | None = None,
) -> optax.OptState:
    """Grow an optax state with the same plan as the model, keeping everything else.

    Every parameter-shaped subtree of the state (Adam's `mu` and `nu`, momentum traces,
    Lion's and Adafactor's statistics, L-BFGS's memory, the inner states of `masked` and
    `multi_transform`, ...) is grown exactly as [`stackops.grow`][] grows the model; step
    counts, hyperparameters and other non-parameter fields are kept. The result has the
    structure that `optimizer.init(grown_params)` gives, so the next `update` runs.

    With `params=`, the parameter-shaped subtrees are found by comparing the state with the
    actual parameters, so label and mask functions that read the model work; without it,
    by calling `optimizer.init` on a placeholder (as `optax.tree.map_params` does).

    **Arguments:**

    - `optimizer`: the `optax.GradientTransformation` that made `opt_state`.
    - `opt_state`: the state to grow.
    - `op`: the growth operator (or plan) used for the model.
    - `where`: the same layer selector as for `grow`, applied to each parameter-shaped
      subtree (so it sees the same type as the model, e.g. `lambda m: m.blocks`).
    - `params`: the parameters (or the whole model) *before* growth. Recommended; required
      for `policy="init"`. With it, the state is checked to belong to the model, and leaves
      whose layout changes with depth (Adafactor's factored statistics) are handled.
    - `policy`: what the moments of new layers start from: `"copy"` the source layers'
      (mixed like the weights for interpolation; default), `"zero"`, or `"init"` (what
      `optimizer.init` gives for the grown parameters).
    - `axis`: the layer axis, as for `grow`.
    - `new_optimizer`: the optimizer built for the grown model, when the old one was
      configured from the old parameter tree (weight-decay masks or `multi_transform` labels
      given as trees). The result then has `new_optimizer.init(grown_params)`'s structure.

    **Returns:** the grown optimizer state.

    !!! Example

        ```python
        import equinox as eqx, jax, optax
        import stackops as so

        keys = jax.random.split(jax.random.key(0), 2)
        model = so.Stack(eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys))
        opt = optax.adamw(1e-3)
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))
        op = so.middle_stack(block=1)
        grown, state = so.grow(model, op, where=lambda m: m), so.grow_opt_state(
            opt, state, op, where=lambda m: m, params=model)
        assert state[0].mu.layers.weight.shape == (3, 4, 4)
        ```
    """
    if policy not in ("copy", "zero", "init"):
        raise ValueError(f'`policy` must be "copy", "zero" or "init", got {policy!r}.')
    for name, o in (("optimizer", optimizer), ("new_optimizer", new_optimizer)):
        if o is not None and not (hasattr(o, "init") and hasattr(o, "update")):
            raise TypeError(
                f"`{name}` must be an optax.GradientTransformation (with init and update), got "
                f"{type(o).__name__}."
            )
    if policy == "init" and params is None:
        raise ValueError('policy="init" needs `params=` (the parameters before growth).')
    init_opt = new_optimizer if new_optimizer is not None else optimizer

    marks: list[bool] = []
    plan: Plan | None = None
    target = fresh_state = None
    if params is not None:
        matched, reason = _match_params(optimizer, opt_state, params)
        if matched is None and reason is not None:
            raise ValueError(
                "grow_opt_state: `opt_state` does not belong to `params` with this `optimizer`: "
                f"{reason}. Pass the model (or params) *before* growth and the optimizer that "
                "made the state."
            )
        form = matched if matched is not None else params
        plan = make_plan(op, view_of(get_layers(form, where), axis=axis))
        marks, treedef, subtrees = _find_by_params(opt_state, form)
        if not any(marks):
            try:
                marks, treedef, subtrees = _find_by_placeholder(optimizer, opt_state)
            except ValueError:
                marks = []
        target, fresh_state = _targets(init_opt, form, plan, where, axis, new_optimizer)
    else:
        marks, treedef, subtrees = _find_by_placeholder(optimizer, opt_state)
    if not any(marks):
        kinds = sorted({type(x).__name__ for x in jax.tree.leaves(opt_state)})
        hint = (
            "Pass `params=` (the parameters before growth) so the state can be searched for "
            "subtrees shaped like them."
            if params is None
            else "No subtree of the state is shaped like `params` (with the same containers)."
        )
        raise ValueError(
            f"grow_opt_state: found nothing parameter-shaped in the optimizer state (leaf types "
            f"{kinds}). {hint} A state whose per-parameter statistics take another form (a "
            "custom transformation) cannot be mapped: re-initialise it with "
            "`optimizer.init(grown_params)`."
        )
    targets = _flatten_like(treedef, target, len(subtrees))
    out = []
    for k, (is_param, sub, tgt) in enumerate(zip(marks, subtrees, targets)):
        if not is_param:
            out.append(sub)  # a non-parameter field: step count, hyperparameters, ...
            continue
        fresh_sub = None
        if fresh_state is not None:
            fresh_sub = lambda k=k: _flatten_like(treedef, fresh_state(), len(subtrees))[k]
        try:
            out.append(_grow_params_like(sub, op, plan, where, axis, policy, tgt, fresh_sub))
        except ValueError as e:
            raise ValueError(
                f"grow_opt_state: could not grow the parameter-shaped state subtree #{k} "
                f"({type(sub).__name__}): {e}"
            ) from e
    new_state = jax.tree.unflatten(treedef, out)
    if target is not None:
        if jax.tree.structure(new_state) != jax.tree.structure(target) or _abstract(
            new_state
        ) != _abstract(target):
            raise ValueError(
                "grow_opt_state: the grown state differs from what the optimizer's `init` gives "
                "for the grown parameters. If the optimizer was configured from the old "
                "parameter tree (masks or labels given as trees), pass `new_optimizer=` built "
                "for the grown model."
            )
    return new_state


def _flatten_like(treedef: Any, tree: Any, n: int) -> list[Any]:
    if tree is None:
        return [None] * n
    return treedef.flatten_up_to(tree)


def _targets(
    init_opt: Any, form: Any, plan: Plan, where: Callable, axis: int, new_optimizer: Any
) -> tuple[Any, Callable[[], Any] | None]:
    """Shapes of `init_opt.init(grown params)`, and a function computing the real state."""
    grow_p = lambda p: grow(p, plan, where=where, axis=axis)
    try:
        # Only shapes: growing the parameters for real would cost a full copy of them.
        target = jax.eval_shape(lambda p: init_opt.init(grow_p(p)), form)
    except Exception as e:  # noqa: BLE001
        if new_optimizer is not None:
            raise ValueError(
                f"grow_opt_state: `new_optimizer.init` failed on the grown parameters "
                f"({type(e).__name__}: {e}): it must be the optimizer built for the grown model."
            ) from e
        raise ValueError(
            f"grow_opt_state: `optimizer.init` failed on the grown parameters "
            f"({type(e).__name__}: {e}). If the optimizer was configured from the old "
            "parameter tree (masks or labels given as trees), pass `new_optimizer=` built for "
            "the grown model."
        ) from e
    cache: list[Any] = []

    def fresh_state() -> Any:
        if not cache:
            cache.append(init_opt.init(grow_p(form)))
        return cache[0]

    return target, fresh_state


def _state_view(container: Any, axis: int) -> LayerView:
    """A view of a state subtree's layers (leaves may lack the layer axis: no depth check)."""
    if isinstance(container, (list, tuple, Stack)) or not _plain_pytree(container):
        return view_of(container, axis=axis, argname="where")
    refuse_penzai_named_arrays(container, "where")
    return LayerView("axis", container, axis=axis)


def _plain_pytree(container: Any) -> bool:
    from ._adapters import find_adapter

    return find_adapter(container) is None


def _grow_params_like(
    sub: Any,
    op: Any,
    plan: Plan | None,
    where: Callable,
    axis: int,
    policy: Policy,
    tgt: Any,
    fresh_sub: Callable[[], Any] | None,
) -> Any:
    container = get_layers(sub, where)
    view = _state_view(container, axis)
    tgt_view = _state_view(get_layers(tgt, where), axis) if tgt is not None else None
    if view.kind == "list":
        if plan is None:
            plan = make_plan(op, view)
        new_view = grow_view(view, plan, checks=False)
        specs, order_out = resolve(plan, None)
        if policy != "copy":
            new_pos = {q for q, i in enumerate(order_out) if not isinstance(specs[i], int)}
            ini = _state_view(get_layers(fresh_sub(), where), axis) if policy == "init" else None  # type: ignore[misc]
            new_view.layers = [
                (_zeros_like(layer) if ini is None else ini.layers[q]) if q in new_pos else layer
                for q, layer in enumerate(new_view.layers)
            ]
        new_container = rebuild(container, new_view)
        return new_container if container is sub else replace_at(where, sub, new_container)

    tree = view.layers.layers if view.kind == "stack" else view.layers
    if plan is None:
        depth = _state_depth(tree, 0 if view.kind == "stack" else axis)
        if view.order is not None:
            depth = len(view.order)
        plan = _plan_at(op, depth, view.order)
    specs, order_out = resolve(plan, view.order)
    n_old = len(set(view.order)) if view.order is not None else plan.depth_in
    n_new = len(specs)
    base_axis = 0 if view.kind == "stack" else axis
    leaves, leaves_def = jax.tree.flatten(tree)
    tgt_leaves = None
    if tgt_view is not None:
        tgt_tree = tgt_view.layers.layers if tgt_view.kind == "stack" else tgt_view.layers
        tgt_leaves = leaves_def.flatten_up_to(tgt_tree)

    # Each leaf is grown along its layer axis, kept (no layer axis: Adafactor's (1,)
    # placeholder), or -- only where its shape says it cannot be mapped, as when Adafactor
    # factors other dimensions at the new depth -- re-initialised, with a warning.
    kinds: list[tuple[str, int]] = []
    for leaf, new in zip(leaves, tgt_leaves or [None] * len(leaves)):
        kinds.append(_leaf_kind(leaf, new, n_old, n_new, base_axis))
    resets = [tuple(x.shape) for x, (k, _) in zip(leaves, kinds) if k == "reset"]
    if resets:
        warnings.warn(
            f"grow_opt_state: {len(resets)} optimizer-state leaves (shapes {resets}) change "
            "layout with depth (e.g. Adafactor factoring other dimensions) and were "
            "re-initialised.",
            stacklevel=4,
        )
    fresh_leaves = None
    if resets or policy == "init":
        fresh_view = _state_view(get_layers(fresh_sub(), where), axis)  # type: ignore[misc]
        fresh_tree = fresh_view.layers.layers if fresh_view.kind == "stack" else fresh_view.layers
        fresh_leaves = leaves_def.flatten_up_to(fresh_tree)
    out_leaves: list[Any] = list(leaves)
    by_axis: dict[int, list[int]] = {}
    for i, (kind, ax) in enumerate(kinds):
        if kind == "grow":
            by_axis.setdefault(ax, []).append(i)
        elif kind == "reset":
            out_leaves[i] = fresh_leaves[i]  # type: ignore[index]
    new_rows = [i for i, sp in enumerate(specs) if not isinstance(sp, int)]
    for ax, idxs in by_axis.items():
        grown = grow_stacked_arrays([leaves[i] for i in idxs], tuple(specs), axis=ax)
        for i, g in zip(idxs, grown):
            sel = (slice(None),) * ax + (jnp.asarray(new_rows, jnp.int32),)
            if new_rows and policy == "zero" and jnp.issubdtype(g.dtype, jnp.inexact):
                g = g.at[sel].set(0)
            elif new_rows and policy == "init":
                g = g.at[sel].set(fresh_leaves[i][sel])  # type: ignore[index]
            out_leaves[i] = g
    new_tree = jax.tree.unflatten(leaves_def, out_leaves)
    if view.kind == "stack":
        new_order = None if order_out == tuple(range(n_new)) else order_out
        new_view = dataclasses.replace(view, layers=_raw_stack(new_tree, new_order, n_new))
    else:
        new_view = dataclasses.replace(view, layers=new_tree)
    new_container = rebuild(container, new_view)
    return new_container if container is sub else replace_at(where, sub, new_container)


def _leaf_kind(leaf: Any, new: Any, n_old: int, n_new: int, axis: int) -> tuple[str, int]:
    shape = tuple(leaf.shape)
    if new is None:
        if len(shape) > axis and shape[axis] == n_old:
            return "grow", axis
        raise ValueError(
            f"a state leaf of shape {shape} has no layer axis of size {n_old} at axis {axis}: "
            "the state does not belong to these layers, or the optimizer keeps statistics "
            "without the layer axis (Adafactor): pass `params=` (the parameters before growth)."
        )
    new_shape = tuple(new.shape)
    if new_shape == shape and (len(shape) <= axis or shape[axis] != n_old or n_old == n_new):
        return "keep", axis
    # The layer axis is where the shapes differ by exactly the depth change (L-BFGS's memory
    # puts it one position later than in the parameters).
    if len(new_shape) == len(shape):
        diff = [k for k, (a, b) in enumerate(zip(shape, new_shape)) if a != b]
        if len(diff) == 1 and shape[diff[0]] == n_old and new_shape[diff[0]] == n_new:
            return "grow", diff[0]
    return "reset", axis


def _state_depth(tree: Any, axis: int) -> int:
    sizes = {
        x.shape[axis] for x in jax.tree.leaves(tree) if is_layer_array(x) and x.ndim > axis
    }
    if len(sizes) != 1:
        raise ValueError(
            "the state's leaves disagree on the layer axis (sizes "
            f"{sorted(sizes)}), as Adafactor's factored statistics do: pass `params=` (the "
            "parameters before growth) so the depth is known."
        )
    return sizes.pop()


def _plan_at(op: Any, depth: int, order: Any) -> Plan:
    if isinstance(op, Plan):
        if op.depth_in != depth:
            raise ValueError(
                f"The plan starts at depth {op.depth_in} but the state's layers have depth "
                f"{depth}: make the plan with `op.plan(depth={depth})`."
            )
        return op
    if not isinstance(op, AbstractGrowth):
        raise TypeError(f"`op` must be a growth operator or a Plan, got {op!r}.")
    return op.plan(depth, order=order)


def _zeros_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else x, tree)


