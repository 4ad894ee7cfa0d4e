"""Growing an optax optimizer state with the same plan as the parameters."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._apply import get_layers, grow, grow_sequence, make_plan
from ._ops import AbstractGrowth
from ._plan import Plan, resolve
from ._stack import Stack

__all__ = ["grow_opt_state"]

Policy = Literal["copy", "zero", "init"]


class _Placeholder:
    """Stands in for the parameters when asking `optimizer.init` where params-shaped trees are."""


jax.tree_util.register_pytree_node(_Placeholder, lambda p: ((), None), lambda _, __: _Placeholder())


def _params_paths(optimizer: Any, opt_state: Any) -> Any:
    """A tree like `opt_state` with True where a params-shaped subtree starts."""
    init = optimizer.init if hasattr(optimizer, "init") else optimizer
    try:
        with_placeholders = init(_Placeholder())
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            "grow_opt_state could not locate the parameter-shaped parts of the optimizer state: "
            f"`optimizer.init` failed on a placeholder ({type(e).__name__}: {e}). Pass the "
            "optimizer that made `opt_state`."
        ) from e
    return with_placeholders


def _candidate_params(params: Any) -> list[Any]:
    cands = [params]
    for f in (eqx.is_inexact_array, eqx.is_array):
        try:
            cands.append(eqx.filter(params, f))
        except Exception:  # noqa: BLE001
            pass
    return cands


def _abstract(tree: Any) -> list[tuple[tuple[int, ...], Any]]:
    """The (shape, dtype) of every leaf, in order (compare together with the tree structure)."""
    return [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _match_params(optimizer: Any, opt_state: Any, params: Any) -> Any:
    """The form of `params` that `optimizer.init` turns into a state shaped like `opt_state`."""
    want = jax.tree.structure(opt_state)
    want_shapes = _abstract(opt_state)
    first_diff = None
    for cand in _candidate_params(params):
        try:
            got = jax.eval_shape(optimizer.init, cand)
        except Exception as e:  # noqa: BLE001
            first_diff = first_diff or f"optimizer.init failed on them ({type(e).__name__}: {e})"
            continue
        if jax.tree.structure(got) == want and _abstract(got) == want_shapes:
            return cand
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
    raise ValueError(
        "grow_opt_state: `opt_state` does not belong to `params` with this `optimizer`: "
        f"{first_diff}. Pass the model (or params) *before* growth and the optimizer that "
        "made the state."
    )


def grow_opt_state(
    optimizer: optax.GradientTransformation,
    opt_state: optax.OptState,
    op: AbstractGrowth | Plan,
    *,
    where: Callable[[Any], Any],
    params: Any = None,
    policy: Policy = "copy",
) -> optax.OptState:
    """Grow an optax state with the same plan as the model, keeping everything else.

    Every parameter-shaped subtree of the state (Adam's `mu` and `nu`, momentum traces,
    Lion's and Adafactor's statistics, ...) is grown exactly as [`stackops.grow`][] grows the
    model; step counts, hyperparameters and other non-parameter fields are kept. The result
    has the structure that `optimizer.init(grown_params)` gives, so the next `update` runs.

    **Arguments:**

    - `optimizer`: the `optax.GradientTransformation` that made `opt_state`.
    - `opt_state`: the state to grow.
    - `op`: the growth operator (or plan) used for the model.
    - `where`: the same layer selector as for `grow`, applied to each parameter-shaped
      subtree (so it sees the same type as the model, e.g. `lambda m: m.blocks`).
    - `params`: the parameters (or the whole model) *before* growth. Optional with the
      `"copy"` and `"zero"` policies; with it, the state is checked to belong to the model
      and leaves that carry no layer axis (Adafactor's factored placeholders) are handled.
      Required for `policy="init"`.
    - `policy`: what the moments of new layers start from: `"copy"` the source layers'
      (mixed like the weights for interpolation; default), `"zero"`, or `"init"` (what
      `optimizer.init` gives for the grown parameters).

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
            opt, state, op, where=lambda m: m)
        assert state[0].mu.layers.weight.shape == (3, 4, 4)
        ```
    """
    if policy not in ("copy", "zero", "init"):
        raise ValueError(f'`policy` must be "copy", "zero" or "init", got {policy!r}.')
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation (with init and update), got "
            f"{type(optimizer).__name__}."
        )
    if policy == "init" and params is None:
        raise ValueError('policy="init" needs `params=` (the parameters before growth).')

    target = None
    fresh_state: Callable[[], Any] | None = None
    if params is not None:
        matched = _match_params(optimizer, opt_state, params)
        # Only the shapes are needed here: growing the parameters for real would cost a full
        # copy of them on every call. They are grown only if a state must be re-initialised.
        target = jax.eval_shape(lambda p: optimizer.init(grow(p, op, where=where)), matched)
        cache: list[Any] = []

        def fresh_state() -> Any:
            if not cache:
                cache.append(optimizer.init(grow(matched, op, where=where)))
            return cache[0]

    placeholders = _params_paths(optimizer, opt_state)
    is_ph = lambda x: isinstance(x, _Placeholder)
    ph_leaves, ph_def = jax.tree.flatten(placeholders, is_leaf=is_ph)
    try:
        subtrees = ph_def.flatten_up_to(opt_state)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "grow_opt_state: `opt_state` does not have the structure that `optimizer.init` "
            f"makes ({e}). Pass the optimizer that made the state."
        ) from e
    if not any(is_ph(p) for p in ph_leaves):
        raise ValueError(
            "grow_opt_state: this optimizer's state holds nothing parameter-shaped to grow; "
            "if it has per-parameter statistics, optax cannot locate them (e.g. a custom "
            "transformation). Re-initialise the state with `optimizer.init(grown_params)`."
        )
    targets = ph_def.flatten_up_to(target) if target is not None else [None] * len(ph_leaves)

    # The plan comes from the parameters when we have them: a state subtree may not show the
    # depth (Adafactor keeps (1,)-shaped placeholders for unfactored leaves).
    ref_seq = get_layers(matched, where) if params is not None else None
    out = []
    for k, (ph, sub, tgt) in enumerate(zip(ph_leaves, subtrees, targets)):
        if not is_ph(ph):
            out.append(sub)  # a non-parameter field: step count, hyperparameters, ...
            continue
        fresh_sub = None
        if fresh_state is not None:
            fresh_sub = lambda k=k: ph_def.flatten_up_to(fresh_state())[k]
        out.append(_grow_params_like(sub, op, where, policy, tgt, fresh_sub, ref_seq))
    new_state = jax.tree.unflatten(ph_def, out)
    if target is not None:
        got = _abstract(new_state)
        if jax.tree.structure(new_state) != jax.tree.structure(target) or got != _abstract(target):
            raise AssertionError(  # pragma: no cover - an internal error, never a user error
                "grow_opt_state produced a state that differs from optimizer.init(grown params)."
            )
    return new_state


def _grow_params_like(
    sub: Any,
    op: Any,
    where: Callable,
    policy: Policy,
    tgt: Any,
    fresh_sub: Callable[[], Any] | None,
    ref_seq: Any,
) -> Any:
    seq = get_layers(sub, where, argname="where")
    if not isinstance(seq, Stack):
        plan = make_plan(op, seq)
        new_seq = grow_sequence(seq, plan)
        specs, order_out = resolve(plan, None)
        if policy != "copy":
            new_pos = {q for q, i in enumerate(order_out) if not isinstance(specs[i], int)}
            ini_seq = get_layers(fresh_sub(), where) if policy == "init" else None  # type: ignore[misc]
            new_seq = type(new_seq)(
                (
                    (jax.tree.map(jnp.zeros_like, layer) if ini_seq is None else ini_seq[q])
                    if q in new_pos
                    else layer
                )
                for q, layer in enumerate(new_seq)
            )
        return new_seq if seq is sub else eqx.tree_at(where, sub, new_seq)

    if ref_seq is not None:
        plan = make_plan(op, ref_seq)
        n_old = ref_seq.num_layers
    else:
        sizes = {a.shape[0] for a in jax.tree.leaves(seq.layers) if getattr(a, "ndim", 0)}
        if len(sizes) > 1:
            raise ValueError(
                "grow_opt_state: the state's leaves disagree on the layer axis (sizes "
                f"{sorted(sizes)}), as Adafactor's factored statistics do: pass `params=` (the "
                "parameters before growth) so the depth is known."
            )
        plan = make_plan(op, seq)
        n_old = seq.num_layers
    specs, order_out = resolve(plan, seq.order)
    n_new = len(specs)
    leaves, leaves_def = jax.tree.flatten(seq.layers)
    tgt_leaves = jax.tree.leaves(get_layers(tgt, where).layers) if tgt is not None else None

    # Each leaf is grown along its layer axis, kept (it has no layer axis: e.g. Adafactor's
    # (1,) placeholder), or -- only where its shape says it cannot be mapped, as when
    # Adafactor factors other dimensions at the new depth -- re-initialised, with a warning.
    kinds = []
    for i, leaf in enumerate(leaves):
        shape = tuple(leaf.shape)
        axis = len(shape) >= 1 and shape[0] == n_old
        if tgt_leaves is None:
            if not axis:
                raise ValueError(
                    f"grow_opt_state: a state leaf of shape {shape} has no leading layer axis "
                    f"of size {n_old}: the state does not belong to these layers, or the "
                    "optimizer keeps statistics without the layer axis (Adafactor): pass "
                    "`params=` (the parameters before growth)."
                )
            kinds.append("grow")
            continue
        new_shape = tuple(tgt_leaves[i].shape)
        if axis and new_shape == (n_new, *shape[1:]):
            kinds.append("grow")
        elif not axis and new_shape == shape:
            kinds.append("keep")
        else:
            kinds.append("reset")
    if "reset" in kinds:
        warnings.warn(
            f"grow_opt_state: {kinds.count('reset')} optimizer-state leaves (shapes "
            f"{[tuple(x.shape) for x, k in zip(leaves, kinds) if k == 'reset']}) change layout "
            "with depth (e.g. Adafactor factoring other dimensions) and were re-initialised.",
            stacklevel=3,
        )
    mask_tree = jax.tree.unflatten(leaves_def, [k == "grow" for k in kinds])
    growable = eqx.filter(seq.layers, mask_tree)
    new_order = None if order_out == tuple(range(n_new)) else order_out
    if any(k == "grow" for k in kinds):
        grown = grow_sequence(Stack(growable, seq.order), plan)
        new_order = grown.order
        grown_leaves = leaves_def.flatten_up_to(grown.layers)
    else:
        grown_leaves = [None] * len(leaves)
    fresh_leaves = None
    if "reset" in kinds or policy == "init":
        fresh_leaves = jax.tree.leaves(get_layers(fresh_sub(), where).layers)  # type: ignore[misc]
    new_rows = [i for i, sp in enumerate(specs) if not isinstance(sp, int)]
    idx = jnp.asarray(new_rows, jnp.int32)
    out_leaves = []
    for i, (kind, leaf) in enumerate(zip(kinds, leaves)):
        if kind == "keep":
            out_leaves.append(leaf)
        elif kind == "reset":
            out_leaves.append(fresh_leaves[i])  # type: ignore[index]
        else:
            g = grown_leaves[i]
            if new_rows and policy == "zero":
                g = g.at[idx].set(0)
            elif new_rows and policy == "init":
                g = g.at[idx].set(fresh_leaves[i][idx])  # type: ignore[index]
            out_leaves.append(g)
    new_seq = _raw_stack(jax.tree.unflatten(leaves_def, out_leaves), new_order)
    if seq is sub:
        return new_seq
    return eqx.tree_at(where, sub, new_seq)


def _raw_stack(layers: Any, order: Any) -> Stack:
    # State subtrees may hold None where the model has non-array fields; build the Stack
    # without re-running its checks on them.
    obj = object.__new__(Stack)
    object.__setattr__(obj, "layers", layers)
    object.__setattr__(obj, "order", order)
    return obj
