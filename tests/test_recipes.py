"""Recipes (LLaMA Pro, SOLAR, Gstack), mergekit configs, the trainable mask, provenance."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stackops as so
from stackops.models import DecoderLM, LMConfig

WHERE = lambda m: m.blocks


def _model(n_layers=4, seed=0, **kw):
    cfg = LMConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=n_layers, max_len=16,
                   mlp="swiglu", n_kv_heads=1, **kw)
    return DecoderLM(cfg, key=jax.random.key(seed))


@given(depth=st.integers(1, 12), every=st.integers(1, 12))
def test_llama_pro_inserts_a_copy_of_the_preceding_layer_after_every_k(depth, every):
    if every > depth:
        with pytest.raises(ValueError, match="every"):
            so.llama_pro(every=every).plan(depth)
        return
    plan = so.llama_pro(every=every).plan(depth)
    assert plan.depth_out == depth + depth // every
    # Dropping the inserted positions gives back the original stack in order.
    kept = [s for q, s in enumerate(plan.sources()) if q not in plan.inserted]
    assert kept == list(range(depth))
    for q in plan.inserted:
        assert plan.sources()[q] == plan.sources()[q - 1]  # a copy of the layer just before
        assert (plan.sources()[q] + 1) % every == 0


@given(depth=st.integers(2, 40), drop=st.integers(1, 39))
def test_solar_is_two_overlapping_slices(depth, drop):
    if drop >= depth:
        with pytest.raises(ValueError, match="drop"):
            so.solar(drop=drop).plan(depth)
        return
    src = so.solar(drop=drop).plan(depth).sources()
    assert src == (*range(depth - drop), *range(drop, depth))


def test_gstack_tiles_and_recipes_check_their_arguments():
    assert so.gstack(times=2).plan(3).sources() == (0, 1, 2, 0, 1, 2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            so.llama_pro(every=bad)
        with pytest.raises(ValueError):
            so.solar(drop=bad)
    with pytest.raises(ValueError, match="times"):
        so.gstack(times=1)


def test_llama_pro_with_preserve_keeps_the_function():
    model = _model()
    grown = so.grow(model, so.llama_pro(every=2), where=WHERE, preserve=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
    assert grown.depth == 6
    run = eqx.filter_jit(lambda m, t: m(t))
    np.testing.assert_allclose(run(grown, tokens), run(model, tokens), atol=1e-6)


@given(depth=st.integers(1, 10), data=st.data())
def test_mergekit_passthrough_round_trips(depth, data):
    op = data.draw(st.sampled_from([
        so.middle_stack(block=1), so.last_stack(block=1), so.gstack(times=2),
        so.layer_map(lambda n: [n - 1, *range(n)]),
    ]))
    plan = op.plan(depth)
    cfg = so.to_mergekit(op, depth, model="m")
    assert so.from_mergekit(cfg).plan(depth).sources() == plan.sources()
    assert so.to_mergekit(so.from_mergekit(cfg), depth, model="m") == cfg


def test_from_mergekit_reads_yaml_text_and_files(tmp_path):
    pytest.importorskip("yaml")
    text = """
slices:
  - sources:
      - model: /models/base
        layer_range: [0, 24]
  - sources:
      - model: /models/base
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""
    (tmp_path / "c.yml").write_text(text)
    for cfg in (text, tmp_path / "c.yml", str(tmp_path / "c.yml")):
        assert so.from_mergekit(cfg).plan(32).sources() == so.solar(drop=8).plan(32).sources()


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"merge_method": "slerp", "slices": []}, "passthrough"),
        ({"slices": []}, "non-empty"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                  {"model": "b", "layer_range": [0, 2]}]}]}, "exactly one"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]}, "layer_range"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                     {"sources": [{"model": "b", "layer_range": [0, 2]}]}]}, "several models"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
                                   "parameters": {"scale": 0}}]}]}, "cannot express"),
        ({"models": [], "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
         "top-level"),
    ],
)
def test_from_mergekit_refuses_what_is_not_depth_growth(cfg, match):
    with pytest.raises(ValueError, match=match):
        so.from_mergekit(cfg)


def test_from_mergekit_range_beyond_the_depth_is_an_error():
    op = so.from_mergekit({"slices": [{"sources": [{"model": "a", "layer_range": [0, 5]}]}]})
    with pytest.raises(ValueError, match="out of range"):
        op.plan(4)


def test_to_mergekit_refuses_mixes():
    with pytest.raises(ValueError, match="mix"):
        so.to_mergekit(so.interpolate(block=1), 4, model="m")
    with pytest.raises(ValueError, match="depth"):
        so.to_mergekit(so.solar(drop=1), model="m")


def _train(model, mask, steps=3):
    opt = optax.chain(optax.adamw(1e-2, weight_decay=0.1), so.freeze(mask))
    params, static = eqx.partition(model, eqx.is_array)
    state = opt.init(params)
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)

    def loss(p):
        logits = eqx.combine(p, static)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return eqx.combine(params, static)


def test_frozen_leaves_get_no_update_and_inserted_layers_train():
    model = _model()
    op = so.llama_pro(every=2)
    plan = so.plan_for(model, op, where=WHERE)
    grown = so.grow(model, op, where=WHERE, preserve=True)
    trained = _train(grown, so.trainable_mask(grown, plan, where=WHERE))
    new = list(plan.inserted)
    old = [q for q in range(grown.depth) if q not in new]
    for a, b in zip(jax.tree.leaves(grown.blocks), jax.tree.leaves(trained.blocks)):
        assert np.array_equal(a[np.asarray(old)], b[np.asarray(old)])  # kept rows: bit-identical
    # every leaf of the inserted layers moved (the zeroed projections too)
    for a, b in zip(jax.tree.leaves(grown.blocks), jax.tree.leaves(trained.blocks)):
        assert not np.array_equal(a[np.asarray(new)], b[np.asarray(new)])
    for leaf in (lambda m: m.embed, lambda m: m.head, lambda m: m.norm_f.scale):
        assert np.array_equal(leaf(grown), leaf(trained))


def test_train_selects_extra_leaves_that_train_in_full():
    model = _model()
    op = so.llama_pro(every=4)
    plan = so.plan_for(model, op, where=WHERE)
    grown = so.grow(model, op, where=WHERE, preserve=True)
    mask = so.trainable_mask(grown, plan, where=WHERE,
                             train=lambda m: (m.norm_f.scale, m.blocks.layers.norm1.scale))
    assert bool(mask.norm_f.scale) and mask.blocks.layers.norm1.scale.all()
    trained = _train(grown, mask)
    assert not np.array_equal(grown.norm_f.scale, trained.norm_f.scale)
    g, t = grown.blocks.layers, trained.blocks.layers
    assert not np.array_equal(g.norm1.scale[0], t.norm1.scale[0])  # selected: kept rows train
    assert np.array_equal(g.norm2.scale[0], t.norm2.scale[0])
    assert np.array_equal(grown.embed, trained.embed)


def test_trainable_mask_on_a_list_layout_and_its_errors():
    layers = [eqx.nn.Linear(3, 3, key=k) for k in jax.random.split(jax.random.key(0), 2)]
    plan = so.llama_pro(every=2).plan(2)
    grown = so.grow(layers, plan, where=lambda s: s)
    mask = so.trainable_mask(grown, plan, where=lambda s: s)
    assert [bool(m.weight) for m in mask] == [False, False, True]
    with pytest.raises(ValueError, match="depth"):
        so.trainable_mask(layers, plan, where=lambda s: s)
    with pytest.raises(TypeError, match="Plan"):
        so.trainable_mask(grown, so.llama_pro(every=2), where=lambda s: s)
    tied_plan = so.loop_tie(block=1).plan(2)
    tied = so.grow(so.stack(layers), tied_plan, where=lambda s: s)
    with pytest.raises(ValueError, match="tied"):
        so.trainable_mask(tied, tied_plan, where=lambda s: s)


def test_provenance_records_every_position():
    plan = so.compose(so.interpolate(block=1, t=0.25), so.loop_tie(block=1)).plan(2)
    rec = so.provenance(plan, op="x", source="dir")
    assert rec["format"] == "stackops.provenance/1" and rec["operator"] == "'x'"
    assert rec["depth_in"] == 2 and rec["depth_out"] == plan.depth_out == len(rec["layers"])
    kinds = [e["kind"] for e in rec["layers"]]
    assert kinds.count("kept") == 2 and "mix" in kinds and "tied" in kinds
    mix = next(e for e in rec["layers"] if e["kind"] == "mix")
    assert mix["from"] == [0, 1] and mix["weights"] == [0.75, 0.25] and mix["inserted"]
    assert not any(e["identity"] for e in rec["layers"])
    with pytest.raises(TypeError, match="Plan"):
        so.provenance(so.solar(drop=1))
