"""grow_opt_state: the optimizer state grows with the model and the next update runs."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_models, tree_equal
from hypothesis import given
from hypothesis import strategies as st

import stackops as so

OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "lion": lambda: optax.lion(1e-4),
    "adafactor": lambda: optax.adafactor(1e-3, min_dim_size_to_factor=4),
    "chain_clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
}

params_of = lambda m: eqx.filter(m, eqx.is_inexact_array)


def _trained_state(opt, model, steps=2):
    """An optimizer state with non-zero moments (a few updates on a toy loss)."""
    params = params_of(model)
    state = opt.init(params)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    for _ in range(steps):
        grads = eqx.filter_grad(lambda m: jnp.mean(jnp.tanh(m(x))))(model)
        updates, state = opt.update(params_of(grads), state, params)
        model = eqx.apply_updates(model, updates)
        params = params_of(model)
    return model, state


CASES = [(name, layout, "copy") for name in sorted(OPTIMIZERS) for layout in ("list", "stack")]
CASES += [
    (name, layout, policy)
    for name in ("adamw", "adafactor")
    for layout in ("list", "stack")
    for policy in ("zero", "init")
]


@pytest.mark.filterwarnings("ignore:grow_opt_state")
@pytest.mark.parametrize("name,layout,policy", CASES)
def test_grown_state_matches_init_structure_and_update_runs(name, layout, policy):
    opt = OPTIMIZERS[name]()
    lm, sm = make_models(4)
    model, state = _trained_state(opt, lm if layout == "list" else sm)
    op = so.middle_stack(block=2)
    grown = so.grow(model, op, where=lambda m: m.blocks)
    new_state = so.grow_opt_state(
        opt, state, op, where=lambda m: m.blocks, params=model, policy=policy
    )
    fresh = opt.init(params_of(grown))
    assert jax.tree.structure(new_state) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, fresh)
    # Step counts and other non-parameter fields are kept.
    kept_old, kept_new = _non_param_parts(opt, state, new_state)
    assert tree_equal(kept_old, kept_new)
    if name != "sgd_momentum":  # every other one keeps a step count
        assert any(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(kept_new))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    grads = params_of(eqx.filter_grad(lambda m: jnp.mean(jnp.tanh(m(x))))(grown))
    updates, _ = opt.update(grads, new_state, params_of(grown))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "lion", "inject_adamw"])
@given(block=st.integers(1, 2), n=st.integers(1, 3), layout=st.sampled_from(["list", "stack"]))
def test_moments_of_copies_equal_their_sources(name, block, n, layout):
    opt = OPTIMIZERS[name]()
    lm, sm = make_models(block * n)
    model, state = _trained_state(opt, lm if layout == "list" else sm, steps=1)
    op = so.middle_stack(block=block)
    new_state = so.grow_opt_state(opt, state, op, where=lambda m: m.blocks)
    plan = op.plan(block * n)
    # Every params-shaped subtree grows exactly like the parameters themselves.
    for old_sub, new_sub in _param_subtrees(opt, state, new_state):
        old_layers = _positions(old_sub.blocks)
        new_layers = _positions(new_sub.blocks)
        for q, s in enumerate(plan.sources()):
            assert tree_equal(new_layers[q], old_layers[s])


def test_zero_policy_zeroes_new_moments_and_keeps_the_rest():
    opt = optax.adam(1e-3)
    _, sm = make_models(3)
    model, state = _trained_state(opt, sm)
    op = so.middle_stack(block=1)
    new = so.grow_opt_state(opt, state, op, where=lambda m: m.blocks, policy="zero")
    mu_old, mu_new = state[0].mu.blocks.layers, new[0].mu.blocks.layers
    assert float(jnp.abs(mu_old.w1[1]).sum()) > 0
    np.testing.assert_array_equal(mu_new.w1[2], 0)  # the inserted copy of block 2
    np.testing.assert_array_equal(mu_new.w1[1], mu_old.w1[1])
    np.testing.assert_array_equal(mu_new.w1[3], mu_old.w1[2])


def test_state_of_another_model_is_rejected_with_a_clear_error():
    opt = optax.adam(1e-3)
    _, small = make_models(2)
    _, big = make_models(4)
    state = opt.init(params_of(big))
    with pytest.raises(ValueError, match="does not belong"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks, params=small)


def test_state_without_layer_axis_is_rejected_without_params():
    opt = optax.adafactor(1e-3, min_dim_size_to_factor=4)
    _, sm = make_models(3)
    state = opt.init(params_of(sm))
    with pytest.raises(ValueError, match="params="):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks)


def test_init_policy_needs_params_and_bad_policy_is_rejected():
    opt = optax.adam(1e-3)
    _, sm = make_models(2)
    state = opt.init(params_of(sm))
    with pytest.raises(ValueError, match="params="):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks, policy="init")
    with pytest.raises(ValueError, match="policy"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks, policy="reset")
    with pytest.raises(TypeError, match="optimizer"):
        so.grow_opt_state(object(), state, so.middle_stack(1), where=lambda m: m.blocks)


def test_wrong_where_for_state_names_the_argument():
    opt = optax.adam(1e-3)
    _, sm = make_models(2)
    state = opt.init(params_of(sm))
    with pytest.raises(ValueError, match="where"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.layers)


def _positions(seq):
    if isinstance(seq, so.Stack):
        n = len(seq)
        return [jax.tree.map(lambda a, i=i: a[i], seq.layers) for i in range(n)]
    return list(seq)


class _Tag:
    pass


jax.tree_util.register_pytree_node(_Tag, lambda t: ((), None), lambda *_: _Tag())


def _split(opt, old_state, new_state):
    tagged = opt.init(_Tag())
    leaves, treedef = jax.tree.flatten(tagged, is_leaf=lambda x: isinstance(x, _Tag))
    return leaves, treedef.flatten_up_to(old_state), treedef.flatten_up_to(new_state)


def _param_subtrees(opt, old_state, new_state):
    """Pairs (old, new) of the params-shaped subtrees of two states."""
    found = [(o, n) for t, o, n in zip(*_split(opt, old_state, new_state)) if isinstance(t, _Tag)]
    assert found
    return found


def _non_param_parts(opt, old_state, new_state):
    """The non-parameter fields (counts, hyperparameters, ...) of two states."""
    pairs = [
        (o, n) for t, o, n in zip(*_split(opt, old_state, new_state)) if not isinstance(t, _Tag)
    ]
    return [o for o, _ in pairs], [n for _, n in pairs]
