"""Property tests of the growth invariants (DESIGN.md, 'Invariants')."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ResMLP, make_layers, make_models, tree_allclose, tree_equal
from hypothesis import given
from hypothesis import strategies as st
from strategies import depth_and_op

import stackops as so
from stackops.models import DecoderLM, LMConfig


def _positions(seq):
    return so.unstack(seq) if isinstance(seq, so.Stack) else list(seq)


def _expected(plan: so.Plan, old: list, pos: int):
    spec = plan.layers[plan.order[pos]]
    if isinstance(spec, so.Keep):
        return old[spec.source], True
    dyn = [eqx.filter(old[s], eqx.is_array) for s in spec.sources]
    mixed = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(spec.weights, xs)), *dyn)
    return eqx.combine(mixed, eqx.filter(old[0], eqx.is_array, inverse=True)), spec.is_copy


@given(depth_and_op(), st.sampled_from(["list", "stack"]))
def test_kept_layers_bit_identical_and_copies_equal_sources(depth_op, layout):
    depth, op = depth_op
    layers = make_layers(depth)
    seq = layers if layout == "list" else so.stack(layers)
    plan = op.plan(depth)
    grown = so.grow(seq, op, where=lambda s: s)
    assert type(grown) is type(seq)
    assert len(grown) == plan.depth_out
    new = _positions(grown)
    for q in range(plan.depth_out):
        want, exact = _expected(plan, layers, q)
        if exact:
            assert tree_equal(new[q], want), f"position {q} of {plan}"
        else:
            assert tree_allclose(new[q], want), f"position {q} of {plan}"


@given(
    depth_and_op(allow_map=False),
    st.sampled_from(["list", "stack"]),
    st.sampled_from(["mlp", "lm"]),
)
def test_preserve_mode_leaves_outputs_unchanged(depth_op, layout, model_kind):
    depth, op = depth_op
    x = jax.random.normal(jax.random.key(7), (3, 4))
    if model_kind == "mlp":
        lm, sm = make_models(depth)
        model = lm if layout == "list" else sm
        where = lambda m: m.blocks
        pres = lambda layer: (layer.w2, layer.b2)
        run = lambda m: m(x)
    else:
        cfg = LMConfig(d_model=16, n_heads=2, n_layers=depth, max_len=8, norm="layer")
        model = DecoderLM(cfg, key=jax.random.key(depth))
        if layout == "list":
            model = eqx.tree_at(lambda m: m.blocks, model, so.unstack(model.blocks))
        tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 256)
        where, pres = (lambda m: m.blocks), True

        def run(m):
            if isinstance(m.blocks, list):  # run the list layout through an equivalent Stack
                m = eqx.tree_at(lambda t: t.blocks, m, so.stack(m.blocks))
            return m(tokens)

    before = run(model)
    grown = so.grow(model, op, where=where, preserve=pres)
    assert len(where(grown)) == op.plan(depth).depth_out
    np.testing.assert_allclose(np.asarray(run(grown)), np.asarray(before), rtol=1e-5, atol=1e-5)


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 3))
def test_untie_of_loop_tie_equals_middle_stack(block, n, repeats):
    depth = block * n
    _, sm = make_models(depth)
    tied = so.grow(sm, so.loop_tie(block=block, repeats=repeats), where=lambda m: m.blocks)
    assert tied.blocks.is_tied
    assert tied.blocks.num_layers == depth
    untied = so.grow(tied, so.untie(), where=lambda m: m.blocks)
    # Untying gives fresh copies at the looped positions: the same as copying them.
    sources = so.loop_tie(block=block, repeats=repeats).plan(depth).sources()
    expected = so.grow(sm, so.layer_map(sources), where=lambda m: m.blocks)
    if repeats == 2:  # ... which for one repeat is exactly one MIDAS stage
        midas = so.grow(sm, so.middle_stack(block=block), where=lambda m: m.blocks)
        assert tree_equal(midas, expected)
    assert tree_equal(untied, expected)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_array_equal(np.asarray(tied(x)), np.asarray(untied(x)))
    # Composed form: one operator doing both.
    both = so.grow(
        sm,
        so.compose(so.loop_tie(block=block, repeats=repeats), so.untie()),
        where=lambda m: m.blocks,
    )
    assert tree_equal(both, untied)


@given(st.integers(1, 2), st.integers(1, 3))
def test_tied_gradient_is_sum_of_untied_gradients(block, n):
    depth = block * n
    _, sm = make_models(depth)
    op = so.loop_tie(block=block, repeats=3)
    tied = so.grow(sm, op, where=lambda m: m.blocks)
    untied = so.grow(tied, so.untie(), where=lambda m: m.blocks)
    x = jax.random.normal(jax.random.key(2), (5, 4))
    loss = lambda m: jnp.sum(jnp.tanh(m(x)))
    g_tied = eqx.filter_grad(loss)(tied)
    g_untied = eqx.filter_grad(loss)(untied)
    order = tied.blocks.order
    summed = jax.tree.map(
        lambda gu: jnp.stack(
            [
                sum(gu[q] for q in range(len(order)) if order[q] == s)
                for s in range(tied.blocks.num_layers)
            ]
        ),
        g_untied.blocks.layers,
    )
    assert tree_allclose(g_tied.blocks.layers, summed, rtol=1e-5, atol=1e-6)
    assert tree_allclose(g_tied.inp, g_untied.inp, rtol=1e-5, atol=1e-6)


@given(
    depth_and_op(allow_map=False), depth_and_op(allow_map=True), st.sampled_from(["list", "stack"])
)
def test_grow_twice_equals_grow_with_composed_operator(first, second, layout):
    depth, a = first
    lm, sm = make_models(depth)
    model = lm if layout == "list" else sm
    mid = so.grow(model, a, where=lambda m: m.blocks)
    mid_depth = len(mid.blocks)
    _, b = second
    try:
        b.plan(mid_depth)
    except ValueError:
        b = so.last_stack(block=1)  # second op's block does not fit the new depth
    twice = so.grow(mid, b, where=lambda m: m.blocks)
    once = so.grow(model, so.compose(a, b), where=lambda m: m.blocks)
    assert tree_allclose(twice, once, rtol=1e-6, atol=1e-6)


@given(depth_and_op())
def test_list_and_stack_layouts_agree(depth_op):
    depth, op = depth_op
    lm, sm = make_models(depth)
    gl = so.grow(lm, op, where=lambda m: m.blocks)
    gs = so.grow(sm, op, where=lambda m: m.blocks)
    assert tree_equal(so.stack(gl.blocks), gs.blocks)
    x = jax.random.normal(jax.random.key(4), (2, 4))
    np.testing.assert_allclose(np.asarray(gl(x)), np.asarray(gs(x)), rtol=1e-5, atol=1e-6)


@given(depth_and_op(), st.sampled_from(["list", "stack"]))
def test_growth_under_jit_equals_eager_growth(depth_op, layout):
    depth, op = depth_op
    lm, sm = make_models(depth)
    model = lm if layout == "list" else sm
    eager = so.grow(model, op, where=lambda m: m.blocks)
    jitted = eqx.filter_jit(lambda m: so.grow(m, op, where=lambda t: t.blocks))(model)
    assert tree_allclose(eager, jitted, rtol=1e-6, atol=1e-7)


def test_birth_stages_after_six_midas_stages_read_1_3_5_6_4_2():
    # Track each block's birth stage through five growths from one block.
    births = [1]
    for stage in range(2, 7):
        plan = so.middle_stack(block=1).plan(len(births))
        births = [
            births[s] if o is not None else stage for s, o in zip(plan.sources(), plan.origin)
        ]
    assert births == [1, 3, 5, 6, 4, 2]


@pytest.mark.parametrize("n,m", [(2, 1), (3, 2), (4, 2), (5, 3)])
def test_middle_stack_copies_block_ceil_n_over_2(n, m):
    plan = so.middle_stack(block=2).plan(2 * n)
    src = plan.sources()
    assert src[2 * m : 2 * m + 2] == (2 * (m - 1), 2 * (m - 1) + 1)
    assert plan.inserted == (2 * m, 2 * m + 1)


def test_interpolate_endpoints_reduce_to_copies():
    layers = make_layers(2)
    g0 = so.grow(layers, so.interpolate(block=1, t=0.0), where=lambda s: s)
    g1 = so.grow(layers, so.interpolate(block=1, t=1.0), where=lambda s: s)
    assert tree_equal(g0[1], layers[0]) and tree_equal(g1[1], layers[1])
    gh = so.grow(layers, so.interpolate(block=1, t=0.5), where=lambda s: s)
    assert np.allclose(gh[1].w1, 0.5 * layers[0].w1 + 0.5 * layers[1].w1)


def test_grow_does_not_modify_its_input():
    lm, sm = make_models(2)
    before = jax.tree.map(np.asarray, (lm, sm))
    so.grow(lm, so.middle_stack(block=1), where=lambda m: m.blocks, preserve=lambda b: (b.w2, b.b2))
    so.grow(sm, so.middle_stack(block=1), where=lambda m: m.blocks, preserve=lambda b: (b.w2, b.b2))
    assert tree_equal(jax.tree.map(jnp.asarray, before), (lm, sm))


def test_gstack_tiles_the_whole_model_in_one_line():
    layers = make_layers(2)
    grown = so.grow(layers, so.layer_map(lambda n: [*range(n)] * 4), where=lambda s: s)
    assert len(grown) == 8
    for q, layer in enumerate(grown):
        assert tree_equal(layer, layers[q % 2])


def test_growing_a_tied_stack_keeps_its_ties():
    _, sm = make_models(2)
    tied = so.grow(sm, so.loop_tie(block=1, repeats=3), where=lambda m: m.blocks)  # middle = B1
    assert tied.blocks.order == (0, 0, 0, 1)
    grown = so.grow(tied, so.last_stack(block=1), where=lambda m: m.blocks)
    assert grown.blocks.order == (0, 0, 0, 1, 2)
    assert tree_equal(grown.blocks.layer(4), tied.blocks.layer(3))


def test_residual_mlp_is_a_valid_second_block_shape():
    layer = ResMLP(4, 6, key=jax.random.key(0))
    zeroed = eqx.tree_at(lambda b: (b.w2, b.b2), layer, replace_fn=jnp.zeros_like)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(np.asarray(zeroed(x)), np.asarray(x))
