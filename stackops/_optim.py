"""Growing an optax optimizer state with the same plan as the parameters."""

from __future__ import annotations

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


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)) if hasattr(x, "shape") else x, tree)


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
                            f"{b.dtype}, but optimizer.init(params) gives {tuple(a.shape)} {a.dtype}"
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
    init_state = None
    if params is not None:
        matched = _match_params(optimizer, opt_state, params)
        grown_params = grow(matched, op, where=where)
        target = jax.eval_shape(optimizer.init, grown_params)
        if policy == "init":
            init_state = optimizer.init(grown_params)

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
    inits = ph_def.flatten_up_to(init_state) if init_state is not None else [None] * len(ph_leaves)

    # The plan comes from the parameters when we have them: a state subtree may not show the
    # depth (Adafactor keeps (1,)-shaped placeholders for unfactored leaves).
    ref_seq = get_layers(matched, where) if params is not None else None
    out = []
    for ph, sub, tgt, ini in zip(ph_leaves, subtrees, targets, inits):
        if not is_ph(ph):
            out.append(sub)  # a non-parameter field: step count, hyperparameters, ...
            continue
        out.append(_grow_params_like(sub, op, where, policy, tgt, ini, ref_seq))
    new_state = jax.tree.unflatten(ph_def, out)
    if target is not None:
        got = _abstract(new_state)
        if jax.tree.structure(new_state) != jax.tree.structure(target) or got != _abstract(target):
            raise AssertionError(  # pragma: no cover - an internal error, never a user error
                "grow_opt_state produced a state that differs from optimizer.init(grown params)."
            )
    return new_state


def _grow_params_like(
    sub: Any, op: Any, where: Callable, policy: Policy, tgt: Any, ini: Any, ref_seq: Any
) -> Any:
    seq = get_layers(sub, where, argname="where")
    if isinstance(seq, Stack):
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
        leaves = jax.tree.leaves(seq.layers)
        tgt_seq = get_layers(tgt, where) if tgt is not None else None
        tgt_leaves = jax.tree.leaves(tgt_seq.layers) if tgt_seq is not None else None
        # Leaves without the layer axis (e.g. Adafactor's placeholder for unfactored
        # dimensions) stay as they are; everything else is grown along axis 0.
        grow_mask = []
        for i, leaf in enumerate(leaves):
            has_axis = getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == n_old
            if tgt_leaves is not None:
                same = tuple(tgt_leaves[i].shape) == tuple(leaf.shape)
                grows = tgt_leaves[i].shape[0] == len(specs) if tgt_leaves[i].ndim else False
                if same and not (has_axis and grows):
                    has_axis = False
                elif not (has_axis and grows):
                    raise ValueError(
                        f"grow_opt_state: a state leaf of shape {tuple(leaf.shape)} cannot be "
                        "grown along its layer axis to the shape optimizer.init gives "
                        f"({tuple(tgt_leaves[i].shape)}); re-initialise this optimizer's state."
                    )
            elif not has_axis and getattr(leaf, "ndim", 0) >= 1:
                raise ValueError(
                    f"grow_opt_state: a state leaf of shape {tuple(leaf.shape)} has no leading "
                    f"layer axis of size {n_old}: the state does not belong to these layers, or "
                    "the optimizer keeps statistics without the layer axis (Adafactor): pass "
                    "`params=` (the parameters before growth)."
                )
            grow_mask.append(has_axis)
        leaves_def = jax.tree.structure(seq.layers)
        mask_tree = jax.tree.unflatten(leaves_def, grow_mask)
        growable = eqx.filter(seq.layers, mask_tree)
        fixed = eqx.filter(seq.layers, mask_tree, inverse=True)
        if any(grow_mask):
            grown = grow_sequence(Stack(growable, seq.order), plan)
            new_layers, new_order = eqx.combine(grown.layers, fixed), grown.order
        else:
            new_layers = fixed
            new_order = None if order_out == tuple(range(len(specs))) else order_out
        new_rows = [i for i, sp in enumerate(specs) if not isinstance(sp, int)]
        if policy != "copy" and new_rows:
            idx = jnp.asarray(new_rows, jnp.int32)
            if policy == "zero":
                fill = lambda a: a.at[idx].set(0) if eqx.is_array(a) else a
                new_layers = jax.tree.map(
                    lambda a, m: fill(a) if m else a, new_layers, mask_tree
                )
            else:
                ini_layers = get_layers(ini, where).layers
                new_layers = jax.tree.map(
                    lambda a, b, m: a.at[idx].set(b[idx]) if (m and eqx.is_array(a)) else a,
                    new_layers,
                    ini_layers,
                    mask_tree,
                )
        new_seq = _raw_stack(new_layers, new_order)
    else:
        plan = make_plan(op, seq)
        new_seq = grow_sequence(seq, plan)
        specs, order_out = resolve(plan, None)
        if policy != "copy":
            new_pos = {q for q, i in enumerate(order_out) if not isinstance(specs[i], int)}
            ini_seq = get_layers(ini, where) if ini is not None else None
            new_seq = type(new_seq)(
                (
                    (jax.tree.map(jnp.zeros_like, layer) if policy == "zero" else ini_seq[q])
                    if q in new_pos
                    else layer
                )
                for q, layer in enumerate(new_seq)
            )
    if seq is sub:
        return new_seq
    return eqx.tree_at(where, sub, new_seq, is_leaf=lambda x: x is None)


def _raw_stack(layers: Any, order: Any) -> Stack:
    # State subtrees may hold None where the model has non-array fields; build the Stack
    # without re-running its checks on them.
    obj = object.__new__(Stack)
    object.__setattr__(obj, "layers", layers)
    object.__setattr__(obj, "order", order)
    return obj
