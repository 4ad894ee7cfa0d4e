"""Bad input gets a clear exception that names the argument, and changes nothing."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import make_layers, make_models, tree_equal

import stackops as so


@pytest.mark.parametrize("block", [0, -1, 1.5, True, "2"])
@pytest.mark.parametrize("make", [so.middle_stack, so.last_stack, so.loop_tie, so.interpolate])
def test_nonpositive_or_non_integer_block_is_rejected(make, block):
    with pytest.raises(ValueError, match="block"):
        make(block=block)


@pytest.mark.parametrize("make", [so.middle_stack, so.last_stack, so.loop_tie, so.interpolate])
def test_block_larger_than_depth_is_rejected(make):
    lm, sm = make_models(2)
    for model in (lm, sm):
        with pytest.raises(ValueError, match="larger than the stack's depth"):
            so.grow(model, make(block=3), where=lambda m: m.blocks)


@pytest.mark.parametrize("make", [so.middle_stack, so.last_stack, so.loop_tie, so.interpolate])
def test_depth_not_divisible_by_block_is_rejected(make):
    _, sm = make_models(3)
    with pytest.raises(ValueError, match="not divisible by block=2"):
        so.grow(sm, make(block=2), where=lambda m: m.blocks)


def test_where_that_does_not_point_at_layers_is_rejected():
    lm, sm = make_models(2)
    with pytest.raises(TypeError, match="where"):
        so.grow(sm, so.middle_stack(1), where=lambda m: m.inp)  # an array, not a sequence
    with pytest.raises(ValueError, match="where"):
        so.grow(sm, so.middle_stack(1), where=lambda m: m.layers)  # no such attribute
    with pytest.raises(TypeError, match="where"):
        so.grow(sm, so.middle_stack(1), where="blocks")
    with pytest.raises(ValueError, match="empty"):
        so.grow(lm, so.middle_stack(1), where=lambda m: [])


def test_layers_of_different_structures_in_one_list_are_rejected():
    layers = make_layers(2, d=4, h=6) + make_layers(1, d=4, h=8)
    with pytest.raises(ValueError, match="layer 2 has a different structure"):
        so.grow(layers, so.middle_stack(1), where=lambda s: s)
    with pytest.raises(ValueError, match="different structure"):
        so.stack(layers)
    with pytest.raises(ValueError, match="different structure"):
        so.grow(
            [make_layers(1)[0], eqx.nn.Linear(4, 4, key=jax.random.key(0))],
            so.last_stack(1),
            where=lambda s: s,
        )


def test_stack_whose_leaves_disagree_on_the_layer_axis_is_rejected():
    layer = eqx.nn.Linear(3, 3, key=jax.random.key(0))
    bad = eqx.tree_at(
        lambda b: (b.weight, b.bias), layer, (jnp.zeros((4, 3, 3)), jnp.zeros((5, 3)))
    )
    with pytest.raises(ValueError, match="disagree on the layer axis"):
        so.Stack(bad)
    with pytest.raises(ValueError, match="order"):
        so.Stack(
            eqx.tree_at(
                lambda b: (b.weight, b.bias), layer, (jnp.zeros((2, 3, 3)), jnp.zeros((2, 3)))
            ),
            order=(0, 0),
        )


def test_tying_on_a_plain_list_is_rejected():
    layers = make_layers(2)
    with pytest.raises(ValueError, match="needs a stackops.Stack"):
        so.grow(layers, so.loop_tie(block=1), where=lambda s: s)
    with pytest.raises(ValueError, match="needs a stackops.Stack"):
        so.grow(layers, so.layer_map([0, 1, 1], tie=True), where=lambda s: s)


def test_preserve_with_tied_insertions_is_rejected():
    _, sm = make_models(2)
    with pytest.raises(ValueError, match="preserve"):
        so.grow(sm, so.loop_tie(block=1), where=lambda m: m.blocks, preserve=lambda b: (b.w2, b.b2))


def test_bad_preserve_selector_is_rejected():
    lm, sm = make_models(2)
    with pytest.raises(ValueError, match="preserve"):
        so.grow(sm, so.middle_stack(1), where=lambda m: m.blocks, preserve=lambda b: b.nope)
    with pytest.raises(TypeError, match="preserve"):
        so.grow(sm, so.middle_stack(1), where=lambda m: m.blocks, preserve="w2")
    layers = [eqx.nn.Linear(2, 2, key=k) for k in jax.random.split(jax.random.key(0), 2)]
    with pytest.raises(ValueError, match="residual_out_leaves"):
        so.grow(layers, so.middle_stack(1), where=lambda s: s, preserve=True)


def test_plan_for_another_depth_is_rejected():
    _, sm = make_models(2)
    with pytest.raises(ValueError, match="depth"):
        so.grow(sm, so.middle_stack(1).plan(3), where=lambda m: m.blocks)
    with pytest.raises(TypeError, match="op"):
        so.grow(sm, "midas", where=lambda m: m.blocks)


def test_operator_arguments_are_validated():
    with pytest.raises(ValueError, match="t"):
        so.interpolate(t=1.5)
    with pytest.raises(ValueError, match="repeats"):
        so.loop_tie(repeats=0)
    with pytest.raises(ValueError, match="align"):
        so.middle_stack(align="center")
    with pytest.raises(TypeError, match="compose"):
        so.compose(so.middle_stack(1), "last")
    with pytest.raises(ValueError, match="out of range"):
        so.layer_map([0, 5]).plan(2)
    with pytest.raises(ValueError, match="empty"):
        so.layer_map([]).plan(2)


def test_unstack_of_tied_stack_is_rejected():
    _, sm = make_models(2)
    tied = so.grow(sm, so.loop_tie(1), where=lambda m: m.blocks)
    with pytest.raises(ValueError, match="untie"):
        so.unstack(tied.blocks)


def test_failed_growth_leaves_the_input_unchanged():
    lm, sm = make_models(3)
    snapshot = jax.tree.map(jnp.copy, (lm, sm))
    for model in (lm, sm):
        with pytest.raises(ValueError):
            so.grow(model, so.middle_stack(block=2), where=lambda m: m.blocks)
    assert tree_equal(snapshot, (lm, sm))
    assert len(lm.blocks) == 3 and len(sm.blocks) == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_steps=3, stages=4), "more steps|at least 4 steps"),
        (dict(total_steps=10, stages=2, alpha=-1), "alpha"),
        (dict(total_steps=10, stages=0), "stages"),
        (dict(total_steps=0, stages=1), "total_steps"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        so.prop_schedule(**kwargs)
