"""Train only what growth inserted: a trainable mask from a plan, and an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._plan import Plan
from ._stack import Stack

__all__ = ["trainable_mask", "freeze"]


def _inserted_rows(plan: Plan, order: tuple[int, ...]) -> set[int]:
    """Stored layers run only by inserted positions (the ones to train)."""
    inserted = set(plan.inserted)
    rows = {order[q] for q in inserted}
    for r in rows:
        users = [q for q, i in enumerate(order) if i == r]
        if any(q not in inserted for q in users):
            raise ValueError(
                f"trainable_mask: {plan.name} inserts positions that share a stored layer with "
                "kept positions (tied); that layer cannot be both frozen and trained. Untie first "
                "(stackops.untie) or use a copying operator."
            )
    return rows


def trainable_mask(
    model: Any,
    plan: Plan,
    *,
    where: Callable[[Any], Any],
    train: Callable[[Any], Any] | None = None,
) -> Any:
    """Which parameters of a grown model train: the layers the plan inserted, nothing else.

    The mask has the structure of `eqx.filter(model, eqx.is_array)` (what `eqx.filter_grad`
    returns). Each leaf is a boolean array that broadcasts against its parameter: a scalar
    for a whole leaf, and, for the leaves of a [`stackops.Stack`][], a `(num_layers, 1, ...)`
    column that is `True` on the rows of inserted layers. Layers the plan kept, and
    everything outside `where` (embeddings, final norm, head), are frozen unless `train`
    selects them. This is the LLaMA Pro recipe: after `llama_pro` with `preserve=True`,
    train only the new blocks. Use it with [`stackops.freeze`][].

    **Arguments:**

    - `model`: the grown model.
    - `plan`: the plan that grew it (e.g. `so.plan_for(old_model, op, where=...)`).
    - `where`: the grown model's layer sequence, as for [`stackops.grow`][].
    - `train`: optionally, a function from the model to leaves (or a tuple of leaves) that
      also train in full, e.g. `lambda m: m.norm_f.scale` or `lambda m: (m.embed, m.head)`.

    **Returns:** the mask pytree.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import stackops as so
        from stackops.models import DecoderLM, LMConfig

        model = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=4), key=jax.random.key(0))
        op = so.llama_pro(every=2)
        plan = so.plan_for(model, op, where=lambda m: m.blocks)
        grown = so.grow(model, op, where=lambda m: m.blocks, preserve=True)
        mask = so.trainable_mask(grown, plan, where=lambda m: m.blocks)
        assert mask.blocks.layers.attn.wo[:, 0, 0].tolist() == [0, 0, 1, 0, 0, 1]
        assert not mask.embed
        ```
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"trainable_mask: `plan` must be a stackops.Plan, got {plan!r}; get it "
                        "with `stackops.plan_for(model_before_growth, op, where=...)`.")
    if not callable(where):
        raise TypeError("trainable_mask: `where` must be a function from the model to its layers,"
                        " e.g. `where=lambda m: m.blocks`.")
    params = eqx.filter(model, eqx.is_array)
    mask = jax.tree.map(lambda x: np.zeros((), bool), params)
    seq = where(model)
    if len(seq) != plan.depth_out:
        raise ValueError(
            f"trainable_mask: the model's layers have depth {len(seq)}, but the plan grows to "
            f"{plan.depth_out}: pass the grown model and the plan that grew it."
        )
    if isinstance(seq, Stack):
        order = tuple(range(len(seq))) if seq.order is None else tuple(seq.order)
        rows = _inserted_rows(plan, order)
        col = np.zeros((seq.num_layers,), bool)
        col[sorted(rows)] = True
        layers_mask = jax.tree.map(
            lambda x: col.reshape(-1, *([1] * (x.ndim - 1))), eqx.filter(seq.layers, eqx.is_array)
        )
        mask = eqx.tree_at(
            lambda m: where(m).layers, mask, layers_mask, is_leaf=lambda x: x is None
        )
    elif isinstance(seq, (list, tuple)):
        rows = _inserted_rows(plan, tuple(range(len(seq))))
        new_seq = [
            jax.tree.map(lambda x, q=q: np.full((), q in rows), eqx.filter(layer, eqx.is_array))
            for q, layer in enumerate(seq)
        ]
        mask = eqx.tree_at(where, mask, type(seq)(new_seq), is_leaf=lambda x: x is None)
    else:
        raise TypeError(f"trainable_mask: `where` must point at a list, tuple or Stack of layers, "
                        f"got {type(seq).__name__}.")
    if train is not None:
        try:
            mask = eqx.tree_at(train, mask, replace_fn=lambda x: np.ones((), bool))
        except Exception as e:  # noqa: BLE001 -- re-raised with the fix
            raise ValueError(
                f"trainable_mask: `train` must select array leaves, e.g. `train=lambda m: "
                f"(m.embed, m.norm_f.scale)` ({type(e).__name__}: {e})."
            ) from e
    return mask


def freeze(mask: Any) -> optax.GradientTransformation:
    """An optax transformation that zeroes the updates of frozen parameters; chain it last.

    Frozen entries (`False` in `mask`, see [`stackops.trainable_mask`][]) get an update of
    exactly zero, so the optimizer never moves them; chaining it after the optimizer
    (`optax.chain(optax.adamw(...), so.freeze(mask))`) also cancels weight decay there,
    which an optimizer that only sees masked gradients would still apply.

    **Arguments:**

    - `mask`: a pytree like the parameters whose leaves broadcast against them (booleans).

    **Returns:** an `optax.GradientTransformation` with an empty state.

    !!! Example

        ```python
        import jax.numpy as jnp, optax
        import stackops as so

        params = {"old": jnp.ones((2, 3)), "new": jnp.ones((2, 3))}
        mask = {"old": jnp.asarray(False), "new": jnp.asarray([[True], [False]])}
        opt = optax.chain(optax.adamw(0.1, weight_decay=0.1), so.freeze(mask))
        grads = {"old": jnp.ones((2, 3)), "new": jnp.ones((2, 3))}
        updates, _ = opt.update(grads, opt.init(params), params)
        assert (updates["old"] == 0).all() and (updates["new"][1] == 0).all()
        assert (updates["new"][0] != 0).all()
        ```
    """

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        try:
            out = jax.tree.map(
                lambda u, m: jnp.where(jnp.asarray(m, bool), u, jnp.zeros((), u.dtype)),
                updates,
                mask,
            )
        except ValueError as e:
            raise ValueError(
                "stackops.freeze: the mask's structure differs from the updates'; build it "
                f"with stackops.trainable_mask on the model being trained ({e})."
            ) from e
        return out, state

    return optax.GradientTransformation(init, update)
