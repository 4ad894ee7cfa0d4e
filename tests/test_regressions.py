"""One regression test per defect found by trying stackops on models written elsewhere."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ResMLP, make_layers, make_models, tree_allclose, tree_equal

import stackops as so

params_of = lambda m: eqx.filter(m, eqx.is_inexact_array)


class KeyBlock(eqx.Module):
    w: jax.Array
    key: jax.Array  # a typed PRNG key, as nnx.Dropout holds


def test_typed_prng_key_leaves_grow_and_copies_keep_their_source_key():
    keys = jax.random.split(jax.random.key(0), 3)
    layers = [KeyBlock(jnp.full((2, 2), float(i)), k) for i, k in enumerate(keys)]
    for seq in (layers, so.stack(layers)):
        grown = so.grow(seq, so.interpolate(block=1, at="all"), where=lambda s: s)
        pos = grown if isinstance(grown, list) else so.unstack(grown)
        assert len(pos) == 5
        # The mix between layers 0 and 1 carries its main source's key (a key cannot be mixed).
        assert bool(jnp.all(jax.random.key_data(pos[1].key) == jax.random.key_data(keys[0])))
        np.testing.assert_allclose(pos[1].w, 0.5)


def test_grow_opt_state_with_a_typed_key_in_the_state():
    model = so.stack(make_layers(2))
    opt = optax.chain(optax.add_noise(0.1, 0.55, 0), optax.adam(1e-3))
    state = opt.init(params_of(model))
    new = so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m, params=model)
    grown = so.grow(model, so.middle_stack(1), where=lambda m: m)
    assert jax.tree.structure(new) == jax.tree.structure(opt.init(params_of(grown)))
    opt.update(params_of(grown), new, params_of(grown))


class Weird:
    """A static value whose `==` is an array operation (like penzai's NamedArray)."""

    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        raise TypeError("== is elementwise here")

    __hash__ = object.__hash__


class IdentityEq:
    """A static value that compares by identity (like a Flax NNX module)."""

    def __init__(self, v):
        self.v = v


class StaticBlock(eqx.Module):
    w: jax.Array
    tag: object = eqx.field(static=True)


def test_structure_check_never_calls_user_eq():
    # Identity-equal static values (NNX modules): equal-looking layers are accepted.
    layers = [StaticBlock(jnp.ones(2) * i, IdentityEq(1)) for i in range(2)]
    assert len(so.grow(layers, so.last_stack(1), where=lambda s: s)) == 3
    assert len(so.stack(layers)) == 2
    # A raising `==` (penzai's NamedArray) is never called by the structure check. (JAX's own
    # jit cache compares static data with `==`, so such values cannot be jitted over at all.)
    weird = [StaticBlock(jnp.ones(2) * i, Weird(1)) for i in range(2)]
    assert len(so.stack(weird)) == 2
    differing = [StaticBlock(jnp.ones(2), IdentityEq(1)), StaticBlock(jnp.ones(2), IdentityEq(2))]
    with pytest.raises(ValueError, match="static fields differ"):
        so.stack(differing)


class Box:
    """A mutable object holding weights that JAX does not see into (penzai's Parameter)."""

    def __init__(self, value):
        self.value = value


class BoxBlock(eqx.Module):
    p: Box


class HalfBoxBlock(eqx.Module):
    w: jax.Array
    p: Box


def test_layers_whose_weights_are_mutable_objects_are_refused_not_shared():
    layers = [BoxBlock(Box(jnp.ones(2))) for _ in range(2)]
    with pytest.raises(ValueError, match="no array leaves"):
        so.grow(layers, so.middle_stack(1), where=lambda s: s)
    half = [HalfBoxBlock(jnp.ones(2), Box(jnp.ones(2))) for _ in range(2)]
    with pytest.raises(ValueError, match="mutable non-array leaf"):
        so.grow(half, so.middle_stack(1), where=lambda s: s)
    with pytest.raises(ValueError, match="mutable"):
        so.stack(half)


class Labelled(eqx.Module):
    """A model with an attribute that label and mask functions read."""

    inp: jax.Array
    blocks: object
    decay_blocks: bool = eqx.field(static=True, default=True)


def _labelled(n, layout="stack"):
    lm, sm = make_models(n)
    m = sm if layout == "stack" else lm
    return Labelled(m.inp, m.blocks)


def _run_opt(opt, model, new_opt=None):
    params = params_of(model)
    state = opt.init(params)
    for k in range(3):  # a few updates with different gradients: non-trivial statistics
        grads = jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1)), params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    model = eqx.combine(params, model)
    op = so.middle_stack(block=1)
    grown = so.grow(model, op, where=lambda m: m.blocks)
    new = so.grow_opt_state(
        opt, state, op, where=lambda m: m.blocks, params=model, new_optimizer=new_opt
    )
    fresh = (new_opt or opt).init(params_of(grown))
    assert jax.tree.structure(new) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, fresh)
    g = params_of(grown)
    updates, _ = (new_opt or opt).update(jax.tree.map(jnp.ones_like, g), new, g)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    return state, new


def test_label_and_mask_functions_that_read_the_model_and_lbfgs():
    def labels(m):  # reads a model attribute: fails on optax's placeholder
        tag = "adam" if m.decay_blocks else "sgd"
        return jax.tree.map(lambda _: tag, m)

    model = _labelled(2)
    mt = optax.multi_transform({"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-2)}, labels)
    _run_opt(mt, model)
    mask = lambda m: jax.tree.map(lambda x: m.decay_blocks and x.ndim >= 2, m)
    _run_opt(optax.adamw(1e-3, mask=mask), model)
    _, sm = make_models(2)
    old, new = _run_opt(optax.chain(optax.scale_by_lbfgs(memory_size=3)), sm)
    # L-BFGS's memory keeps the layer axis one position later; copies got their source's rows.
    mem_old = old[0].diff_params_memory.blocks.layers.w1
    mem_new = new[0].diff_params_memory.blocks.layers.w1
    assert float(jnp.abs(mem_old[:, 0]).sum()) > 0
    np.testing.assert_array_equal(mem_new[:, 1], mem_old[:, 0])


def test_optimizer_configured_from_the_old_tree_crosses_growth_with_new_optimizer():
    model = _labelled(2, layout="list")  # growth changes the tree: the old mask no longer fits
    mask_for = lambda m: jax.tree.map(lambda x: x.ndim >= 2, params_of(m))
    opt = optax.adamw(1e-3, mask=mask_for(model))
    grown = so.grow(model, so.middle_stack(1), where=lambda m: m.blocks)
    params = params_of(model)
    state = opt.init(params)
    with pytest.raises(ValueError, match="new_optimizer"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks, params=model)
    _run_opt(opt, model, new_opt=optax.adamw(1e-3, mask=mask_for(grown)))


class IdxBlock(eqx.Module):
    w: jax.Array
    idx: int


def test_stack_refuses_per_layer_non_array_fields_instead_of_keeping_layer_0s():
    layers = [IdxBlock(jnp.ones(2), i) for i in range(3)]
    with pytest.raises(ValueError, match=r"non-array leaf \.idx differs"):
        so.stack(layers)
    # A list keeps every layer's own value; copies carry their source's.
    grown = so.grow(layers, so.middle_stack(1), where=lambda s: s)
    assert [layer.idx for layer in grown] == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: so.middle_stack(block=np.int64(2)).plan(np.int64(4)), None, None),  # type: ignore[arg-type, list-item]
        (lambda: so.prop_schedule(np.int64(100), np.int64(4)), None, None),  # type: ignore[arg-type, list-item]
        (lambda: so.layer_map([np.int64(0), [(np.int32(0), 0.5), (0, 0.5)]]).plan(1), None, None),  # type: ignore[arg-type, list-item]
        (lambda: so.layer_map([0.5]), TypeError, "sources\\[0\\]"),  # type: ignore[arg-type, list-item]
        (lambda: so.layer_map(["a"]), TypeError, "sources\\[0\\]"),  # type: ignore[arg-type, list-item]
        (lambda: so.layer_map([[(0, "w")]]), TypeError, "weight"),  # type: ignore[arg-type, list-item]
        (lambda: so.layer_map([[(0, float("nan"))]]).plan(1), ValueError, "finite"),
        (lambda: so.layer_map([[(0, float("inf"))]]).plan(1), ValueError, "finite"),
        (lambda: so.middle_stack(1).plan(depth=2.0), TypeError, "depth"),  # type: ignore[arg-type, list-item]
        (lambda: so.Plan(1, (so.Keep(0),), (3,)), ValueError, "order"),
        (lambda: so.Plan(1, (so.Keep(0),), ("a",)), TypeError, "order"),  # type: ignore[arg-type, list-item]
        (lambda: so.prop_schedule(100, 3, alpha=float("inf")), ValueError, "finite"),
        (lambda: so.stage_at(0, ()), ValueError, "empty"),
    ],
)
def test_inputs_are_validated_with_clear_errors(call, exc, match):
    if exc is None:
        call()
    else:
        with pytest.raises(exc, match=match):
            call()


def test_prop_schedule_with_huge_alpha_and_many_stages():
    assert so.prop_schedule(100, 3, alpha=500) == (1, 1, 98)
    assert so.ideal_speedup(5, alpha=1000) == pytest.approx(1.0)
    sched = so.prop_schedule(10**6, 10**5)
    assert sum(sched) == 10**6 and min(sched) >= 1 and len(sched) == 10**5
    assert so.prop_schedule(210, 6) == (10, 20, 30, 40, 50, 60)


class BiasBlock(eqx.Module):
    """A pre-LN-free residual block with biases: x + lin2(tanh(lin1(x)))."""

    lin1: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __call__(self, x):
        return x + self.lin2(jnp.tanh(self.lin1(x)))


def test_preserve_selects_modules_and_zeroes_their_biases_and_the_check_names_a_miss():
    keys = jax.random.split(jax.random.key(0), 4)
    blocks = [BiasBlock(eqx.nn.Linear(4, 4, key=a), eqx.nn.Linear(4, 4, key=b))
              for a, b in (keys[:2], keys[2:])]
    run = lambda bs, x: so.stack(bs)(x)
    x = jnp.linspace(-1, 1, 4)
    good = so.grow(blocks, so.middle_stack(1), where=lambda s: s, preserve=lambda b: b.lin2)
    assert so.check_preserved(blocks, good, x, apply=run) < 1e-6
    np.testing.assert_array_equal(good[1].lin2.bias, 0)
    bad = so.grow(blocks, so.middle_stack(1), where=lambda s: s,
                  preserve=lambda b: b.lin2.weight)
    with pytest.raises(ValueError, match="moved by up to"):
        so.check_preserved(blocks, bad, x, apply=run)
    # The same on a Stack: the selector sees the stacked module.
    st = so.grow(so.stack(blocks), so.middle_stack(1), where=lambda s: s,
                 preserve=lambda b: b.lin2)
    np.testing.assert_allclose(st(x), run(blocks, x), rtol=1e-6, atol=1e-6)


def test_many_mixes_grow_like_the_list_layout():
    layers = make_layers(40)
    op = so.interpolate(block=1, t=0.3, at="all")  # 39 mixes: the batched path
    gl = so.grow(layers, op, where=lambda s: s)
    gs = so.grow(so.stack(layers), op, where=lambda s: s)
    assert tree_allclose(so.stack(gl), gs, rtol=1e-6, atol=1e-7)
    for q, layer in enumerate(so.unstack(gs)):
        if q % 2 == 0:
            assert tree_equal(layer, layers[q // 2])


@pytest.mark.skipif(not hasattr(optax.contrib, "muon"), reason="this optax has no muon")
def test_muon_updates_agree_between_list_and_stack_layouts():
    lm, sm = make_models(3)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    loss = lambda m: jnp.mean(jnp.tanh(m(x)))
    gl, gs = params_of(eqx.filter_grad(loss)(lm)), params_of(eqx.filter_grad(loss)(sm))
    opt_l = optax.contrib.muon(1e-2)
    opt_s = optax.contrib.muon(
        1e-2, muon_weight_dimension_numbers=so.muon_dimension_numbers(lambda m: m.blocks)
    )
    ul, _ = opt_l.update(gl, opt_l.init(params_of(lm)), params_of(lm))
    us, _ = opt_s.update(gs, opt_s.init(params_of(sm)), params_of(sm))
    assert tree_allclose(so.stack(ul.blocks).layers, us.blocks.layers, rtol=1e-4, atol=1e-6)
    assert tree_allclose(ul.inp, us.inp, rtol=1e-4, atol=1e-6)
    # Without the helper muon orthogonalises the stacked (L, d) vectors instead: different.
    opt_d = optax.contrib.muon(1e-2)
    ud, _ = opt_d.update(gs, opt_d.init(params_of(sm)), params_of(sm))
    assert not tree_allclose(so.stack(ul.blocks).layers, ud.blocks.layers, rtol=1e-4, atol=1e-6)


def test_resmlp_helper_is_used():  # keeps the import of ResMLP meaningful for other tests
    assert ResMLP(4, 6, key=jax.random.key(0)).w1.shape == (4, 6)


def _opaque_optimizer():
    """A custom transformation whose state optax cannot see into (a flat list of arrays)."""

    def init(params):
        return [jnp.zeros_like(x) for x in jax.tree.leaves(params)]

    def update(updates, state, params=None):
        return updates, state

    return optax.GradientTransformation(init, update)


def test_an_unmappable_state_gets_an_error_saying_what_to_pass():
    _, sm = make_models(2)
    opt = _opaque_optimizer()
    state = opt.init(params_of(sm))
    with pytest.raises(ValueError, match="could not map `opt_state`.*Pass `params=`"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks)
    with pytest.raises(ValueError, match="found nothing parameter-shaped"):
        so.grow_opt_state(opt, state, so.middle_stack(1), where=lambda m: m.blocks, params=sm)
    failing = optax.GradientTransformation(lambda p: p.nope, lambda u, s, p=None: (u, s))
    with pytest.raises(ValueError, match="Pass `params=`"):
        so.grow_opt_state(failing, state, so.middle_stack(1), where=lambda m: m.blocks)
