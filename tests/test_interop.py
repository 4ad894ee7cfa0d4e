"""Growth on other libraries' layer containers, with the real libraries (the interop extra).

For each container: every operator; kept layers bit-identical; copies equal their sources and
share no buffer or mutable object with them; `preserve` makes an identity; jit equals eager;
the grown optimizer state has `optimizer.init(grown)`'s structure and the next update runs.
"""

from __future__ import annotations

import importlib.util

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from interop_models import (
    axis_dict,
    haliax_stacked,
    nnx_list,
    penzai_layer_stack,
    penzai_sequential,
)
from strategies import depth_and_op

import stackops as so

_HAS = {m: importlib.util.find_spec(m) is not None for m in ("haliax", "penzai", "flax")}


def _need(mod):
    return pytest.mark.skipif(not _HAS[mod], reason=f"needs {mod} (the interop extra)")


BUILDERS = {
    "axis0_dict": (lambda n: axis_dict(n, 0), None),
    "axis1_dict": (lambda n: axis_dict(n, 1), None),
    "haliax_stacked": (haliax_stacked, "haliax"),
    "penzai_sequential": (penzai_sequential, "penzai"),
    "penzai_layer_stack": (penzai_layer_stack, "penzai"),
    "nnx_list": (nnx_list, "flax"),
}


def _params(name):
    builder, mod = BUILDERS[name]
    marks = [_need(mod)] if mod else []
    return pytest.param(name, marks=marks, id=name)


ALL = [_params(n) for n in BUILDERS]
OPS = [
    so.middle_stack(block=1),
    so.middle_stack(block=2),
    so.last_stack(block=1),
    so.interpolate(block=1, t=0.25),
    so.interpolate(block=1, at="all"),
    so.layer_map([0, 3, 1, 1, 2]),
    so.compose(so.middle_stack(block=2), so.last_stack(block=1)),
    so.untie(),
]


def _expected(plan, old, q):
    spec = plan.layers[plan.order[q]]
    if isinstance(spec, so.Keep):
        return old[spec.source], True
    mixed = [sum(w * old[s][k] for s, w in zip(spec.sources, spec.weights)) for k in
             range(len(old[0]))]
    return mixed, spec.is_copy


def _grow(case, model, op, **kw):
    return so.grow(model, op, where=case.where, axis=case.axis, **kw)


@pytest.mark.parametrize("op", OPS, ids=repr)
@pytest.mark.parametrize("name", ALL)
def test_every_operator_keeps_layers_bit_identical_and_copies_equal_sources(name, op):
    case = BUILDERS[name][0](4)
    old = case.positions(case.model)
    grown = _grow(case, case.model, op)
    plan = op.plan(4)
    new = case.positions(grown)
    assert len(new) == plan.depth_out
    for q in range(plan.depth_out):
        want, exact = _expected(plan, old, q)
        for a, b in zip(new[q], want):
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert case.run is None or np.isfinite(np.asarray(case.run(grown))).all()


def _buffers(tree):
    out = set()
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            out.add(x.unsafe_buffer_pointer())
    return out


def _mutable_ids(tree):
    """ids of the mutable objects in a tree (penzai variables, NNX modules and variables)."""
    ids = set()
    if _HAS["penzai"]:
        from penzai import pz

        for v in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, pz.AbstractVariable)):
            if isinstance(v, pz.AbstractVariable):
                ids.add(id(v))
    if _HAS["flax"]:
        from flax import nnx

        for _, node in nnx.iter_graph(tree) if isinstance(tree, nnx.Module) else ():
            if isinstance(node, (nnx.Module, nnx.Variable)):
                ids.add(id(node))
    return ids


@pytest.mark.parametrize("name", ALL)
def test_copies_share_no_buffer_or_mutable_object_with_the_input(name):
    case = BUILDERS[name][0](2)
    grown = _grow(case, case.model, so.middle_stack(block=1))
    old_mut, new_mut = _mutable_ids(case.model), _mutable_ids(grown)
    assert not (old_mut & new_mut), "the grown model shares mutable objects with the input"
    # The copy (position 1, of position 0) holds its source's values.
    assert so.middle_stack(block=1).plan(2).sources() == (0, 0, 1)
    new = case.positions(grown)
    for a, b in zip(new[0], new[1]):
        np.testing.assert_array_equal(a, b)
    if not name.startswith("penzai"):
        assert not (_buffers(case.where(case.model)) & _buffers(case.where(grown))) or (
            name.startswith("nnx")  # NNX: kept layers keep their (immutable) arrays
        )
    # Mutating the grown penzai/NNX model never changes the input.
    before = case.positions(case.model)
    if _HAS["penzai"] and name.startswith("penzai"):
        from penzai import pz

        for v in pz.select(grown).at_instances_of(pz.Parameter).get_sequence():
            v.value = jax.tree.map(lambda a: a * 0 + 7.0, v.value)
    if _HAS["flax"] and name.startswith("nnx"):
        for b in grown.blocks:
            b.up.kernel.value = b.up.kernel.value * 0 + 7.0
    after = case.positions(case.model)
    for xs, ys in zip(before, after):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", [n for n in ALL if n.values[0] != "penzai_layer_stack"])
def test_preserve_makes_new_layers_identities(name):
    case = BUILDERS[name][0](3)
    before = np.asarray(case.run(case.model))
    for op in (so.middle_stack(block=1), so.last_stack(block=1), so.interpolate(block=1)):
        grown = _grow(case, case.model, op, preserve=case.preserve)
        np.testing.assert_allclose(np.asarray(case.run(grown)), before, rtol=1e-5, atol=1e-5)
        so.check_preserved(case.model, grown, apply=case.run)


@pytest.mark.parametrize(
    "name", [n for n in ALL if n.values[0] in ("axis0_dict", "axis1_dict", "haliax_stacked")]
)
def test_growth_under_jit_equals_eager_growth(name):
    case = BUILDERS[name][0](4)
    for op in (so.middle_stack(block=2), so.interpolate(block=1, at="all")):
        eager = _grow(case, case.model, op)
        jitted = eqx.filter_jit(lambda m, op=op: _grow(case, m, op))(case.model)
        for xs, ys in zip(case.positions(eager), case.positions(jitted)):
            for x, y in zip(xs, ys):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_axis_1_equals_moving_the_axis_to_0_and_growing():
    c1, c0 = axis_dict(4, 1), axis_dict(4, 0)
    for op in OPS:
        g1 = so.grow(c1.model, op, where=c1.where, axis=1)
        g0 = so.grow(c0.model, op, where=c0.where, axis=0)
        moved = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), c1.where(g1))
        jax.tree.map(np.testing.assert_array_equal, moved, c0.where(g0))


_HAS_MUON = hasattr(optax.contrib, "muon")


def _optimizers(case):
    wd_mask = lambda p: jax.tree.map(lambda x: eqx.is_inexact_array(x) and x.ndim >= 2, p)
    label = lambda p: jax.tree.map(
        lambda x: "adam" if eqx.is_inexact_array(x) and x.ndim >= 2 else "sgd", p
    )
    return {
        "adamw": optax.adamw(1e-3),
        "adamw_mask_fn": optax.adamw(1e-3, mask=wd_mask),
        "multi_transform": optax.multi_transform(
            {"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-2, momentum=0.9)}, label
        ),
        # optax.contrib.muon is newer than the floor optax (0.2.4) the library is also tested on.
        **({"muon": optax.contrib.muon(1e-3)} if _HAS_MUON else {}),
    }


OPT_NAMES = ["adamw", "adamw_mask_fn", "multi_transform", "muon"]


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize(
    "name", [n for n in ALL if n.values[0] in ("axis0_dict", "axis1_dict", "haliax_stacked",
                                                "nnx_list")]
)
def test_grown_opt_state_has_init_structure_and_update_runs(name, opt_name):
    if opt_name == "muon" and not _HAS_MUON:
        pytest.skip("this optax has no optax.contrib.muon")
    case = BUILDERS[name][0](2)
    opt = _optimizers(case)[opt_name]
    params = eqx.filter(case.params(case.model), eqx.is_inexact_array)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)  # non-zero moments
    op = so.middle_stack(block=1)
    where = case.state_where or case.where
    grown_params = so.grow(params, op, where=where, axis=case.axis)
    new_state = so.grow_opt_state(opt, state, op, where=where, params=params, axis=case.axis)
    fresh = opt.init(grown_params)
    assert jax.tree.structure(new_state) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, fresh)
    g = jax.tree.map(jnp.ones_like, grown_params)
    updates, _ = opt.update(g, new_state, grown_params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@_need("flax")
def test_nnx_state_grows_and_split_merge_round_trips():
    from flax import nnx

    case = nnx_list(2)
    op = so.middle_stack(block=1)
    grown = so.grow(case.model, op, where=case.where)
    graphdef, state = nnx.split(grown)
    merged = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(case.run(merged)), np.asarray(case.run(grown)))
    # Growing the split state directly gives the split of the grown model.
    _, old_state = nnx.split(case.model)
    grown_state = so.grow(old_state, op, where=lambda s: s["blocks"])
    a, b = jax.tree.leaves(grown_state), jax.tree.leaves(state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    remerged = nnx.merge(graphdef, grown_state)
    np.testing.assert_array_equal(np.asarray(case.run(remerged)), np.asarray(case.run(grown)))


@_need("haliax")
def test_haliax_named_layer_axis_follows_the_depth_and_on_depth_updates_a_config():
    import dataclasses

    case = haliax_stacked(2)
    grown = so.grow(case.model, so.compose(so.middle_stack(1), so.last_stack(1)), where=case.where)
    assert grown.blocks.Block.size == 4
    for leaf in jax.tree.leaves(grown.blocks.stacked, is_leaf=lambda x: hasattr(x, "axes")):
        assert leaf.resolve_axis("layer").size == 4
    assert np.isfinite(case.run(grown)).all()
    with pytest.raises(ValueError, match="tied"):
        so.grow(case.model, so.loop_tie(block=1), where=case.where)

    @dataclasses.dataclass(frozen=True)
    class Config:
        num_layers: int

    class WithConfig(eqx.Module):
        blocks: object
        config: Config = eqx.field(static=True)

    m = WithConfig(case.model.blocks, Config(2))
    g = so.grow(
        m,
        so.middle_stack(1),
        where=lambda m: m.blocks,
        on_depth=lambda m, n: WithConfig(m.blocks, dataclasses.replace(m.config, num_layers=n)),
    )
    assert g.config.num_layers == 3 and g.blocks.Block.size == 3


@_need("penzai")
def test_penzai_copies_get_fresh_unique_labels():
    from penzai import pz

    case = penzai_sequential(2)
    grown = so.grow(case.model, so.middle_stack(1), where=case.where)
    labels = [p.label for p in pz.select(grown).at_instances_of(pz.Parameter).get_sequence()]
    assert len(labels) == len(set(labels))
    old = {p.label for p in pz.select(case.model).at_instances_of(pz.Parameter).get_sequence()}
    assert old < set(labels)


@_need("penzai")
@pytest.mark.parametrize("make", [penzai_sequential, penzai_layer_stack])
def test_penzai_state_on_frozen_variables_grows_with_the_model(make):
    """An optax state built on `pz.freeze_variables(model)` mirrors the model: it grows with
    it, stays frozen (the optimizer's types), carries the copied layers' moments, and fits
    the grown model's frozen variables for the next update."""
    from penzai import pz

    model = make(3).model
    op = so.middle_stack(block=1)
    frozen = pz.freeze_variables(model)
    opt = optax.adam(1e-3)
    state = opt.init(frozen)
    grads = jax.tree.map(lambda x: x * 0 + 1.0, frozen)
    _, state = opt.update(grads, state, frozen)
    grown_model = so.grow(model, op, where=lambda m: m)
    grown_frozen = pz.freeze_variables(grown_model)
    for kw in ({"params": frozen}, {}):
        grown = so.grow_opt_state(opt, state, op, where=lambda s: s, **kw)
        assert jax.tree.structure(grown) == jax.tree.structure(opt.init(grown_frozen))
        assert not pz.select(grown).at_instances_of(pz.AbstractVariable).count()
        mu_in, mu_out = state[0].mu, grown[0].mu
        per_in = (
            [jax.tree.leaves(layer) for layer in mu_in.sublayers]
            if isinstance(mu_in, pz.nn.Sequential)
            else [[np.asarray(x) for x in jax.tree.leaves(mu_in)]]
        )
        if isinstance(mu_in, pz.nn.Sequential):
            sources = op.plan(3).sources()
            for i, src in enumerate(sources):
                for a, b in zip(jax.tree.leaves(mu_out.sublayers[i]), per_in[src]):
                    np.testing.assert_array_equal(a, b)
        else:
            assert mu_out.stack_axis_size == 4
        opt.update(jax.tree.map(lambda x: x * 0 + 1.0, grown_frozen), grown, grown_frozen)
    # Growing the frozen model keeps it frozen too.
    assert not pz.select(so.grow(frozen, op, where=lambda m: m)).at_instances_of(
        pz.AbstractVariable).count()


@_need("penzai")
def test_a_penzai_state_keyed_by_labels_is_refused_not_grown_along_a_named_axis():
    """A dict of penzai NamedArrays (optax on `{label: value}`) has no positional layer axis:
    even when every array's first axis happens to agree it is refused, never grown."""
    from penzai import pz

    state = {f"block{i}.w": pz.nx.wrap(jnp.full((3, 4), float(i)), "a", "b") for i in range(3)}
    with pytest.raises(TypeError, match="penzai NamedArrays.*freeze_variables"):
        so.grow(state, so.middle_stack(block=1), where=lambda s: s)
    opt = optax.adam(1e-3)
    with pytest.raises(TypeError, match="keyed by parameter labels"):
        so.grow_opt_state(opt, opt.init(state), so.middle_stack(block=1), where=lambda s: s)


def test_stack_and_unstack_with_a_layer_axis_round_trip():
    layers = [{"w": jnp.full((2, 3), float(i))} for i in range(4)]
    t = so.stack(layers, axis=1)
    assert t["w"].shape == (2, 4, 3)
    back = so.unstack(t, axis=1)
    for a, b in zip(back, layers):
        np.testing.assert_array_equal(a["w"], b["w"])
    with pytest.raises(ValueError, match="axis"):
        so.unstack({"w": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))}, axis=0)
    with pytest.raises(ValueError, match="axis"):
        so.grow({"w": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))}, so.last_stack(1),
                where=lambda p: p)
    with pytest.raises(ValueError, match="Stack"):
        so.grow({"w": jnp.zeros((2, 4))}, so.loop_tie(1), where=lambda p: p)
    with pytest.raises(ValueError, match="drop `axis=`"):
        so.grow([jnp.zeros(2)] * 2, so.last_stack(1), where=lambda p: p, axis=1)


@_need("flax")
def test_a_grown_nnx_list_shares_no_module_or_variable_with_the_input():
    from flax import nnx

    blocks = nnx_list(2).model.blocks
    grown = so.grow(blocks, so.middle_stack(block=1), where=lambda b: b)
    assert isinstance(grown, nnx.List) and len(grown) == 3
    kinds = (nnx.Module, nnx.Variable)
    ids = lambda t: {id(n) for _, n in nnx.iter_graph(t) if isinstance(n, kinds)}
    assert not (ids(blocks) & ids(grown))


@given(depth_and_op(), st.sampled_from([0, 1, 2]))
def test_any_layer_axis_grows_like_axis_0(depth_op, axis):
    depth, op = depth_op
    c0 = axis_dict(depth, 0)
    g0 = so.grow(c0.model, op, where=c0.where)
    layers = jax.tree.map(lambda a: jnp.moveaxis(a, 0, axis) if a.ndim > axis else a,
                          c0.where(c0.model))
    if any(a.ndim <= axis for a in jax.tree.leaves(c0.where(c0.model))):
        with pytest.raises(ValueError, match="axis"):
            so.grow(layers, op, where=lambda t: t, axis=axis)
        return
    g = so.grow(layers, op, where=lambda t: t, axis=axis)
    moved = jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), g)
    jax.tree.map(np.testing.assert_array_equal, moved, c0.where(g0))
    old = c0.positions(c0.model)
    plan = op.plan(depth)
    for q, new in enumerate(c0.positions(g0)):
        want, exact = _expected(plan, old, q)
        for a, b in zip(new, want):
            (np.testing.assert_array_equal if exact else np.testing.assert_allclose)(a, b)


@pytest.mark.parametrize("policy", ["zero", "init"])
def test_axis_1_opt_state_policies(policy):
    case = axis_dict(3, 1)
    opt = optax.adam(1e-3)
    params = case.model
    state = opt.init(params)
    _, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
    op = so.middle_stack(block=1)  # inserts a copy of layer 1 at position 2
    new = so.grow_opt_state(opt, state, op, where=case.where, axis=1, params=params,
                            policy=policy)
    mu_old = case.where(state[0].mu)["mlp"]["wi"]
    mu_new = case.where(new[0].mu)["mlp"]["wi"]
    assert mu_new.shape == (4, 4, 6)
    np.testing.assert_array_equal(mu_new[:, 2], 0)  # zero, and adam's init is zero too
    np.testing.assert_array_equal(mu_new[:, 3], mu_old[:, 2])
    assert float(jnp.abs(mu_old[:, 1]).sum()) > 0
