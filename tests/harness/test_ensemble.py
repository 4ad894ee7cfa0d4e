"""Seed-batched training (stackops_harness/ensemble.py): member s equals seed s trained alone."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stackops as so
from stackops_harness.config import preset
from stackops_harness.ensemble import (
    RandomWindows,
    ensemble_logits,
    fixed_windows,
    seed_model,
    train_ensemble,
)
from stackops_harness.evaluate import next_token_loss
from stackops_harness.methods import growth_schedule
from stackops_harness.state import blocks, build_model, make_optimizer

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000)


def _cfg(method="midas", **kw):
    return preset("smoke", method=method, total_steps=9, warmup_steps=1, eval_every=3,
                  stages=3, depth=3, d_model=16, n_heads=2, seq_len=16, global_batch=2, **kw)


def _sequential(cfg, seed, batches):
    """An independent, unbatched run of one seed: the reference."""
    schedule = growth_schedule(cfg)
    optimizer, _ = make_optimizer(cfg)
    model = build_model(cfg, jax.random.key(seed), schedule.initial_depth)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    step = 0
    for stage, length in enumerate(schedule.lengths):

        @jax.jit
        def update(params, opt_state, tokens, static=static):
            grads = jax.grad(lambda p: next_token_loss(eqx.combine(p, static), tokens))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        for _ in range(length):
            params, opt_state = update(params, opt_state, jnp.asarray(batches(step)[0]))
            step += 1
        if stage < len(schedule.ops):
            op = schedule.ops[stage]
            model = eqx.combine(params, static)
            opt_state = so.grow_opt_state(optimizer, opt_state, op, where=blocks, params=params,
                                          policy=cfg.opt_policy)
            params, static = eqx.partition(so.grow(model, op, where=blocks), eqx.is_array)
    return eqx.combine(params, static)


@pytest.mark.parametrize("method", ["midas", "baseline"])
def test_every_member_equals_its_seed_trained_alone(method):
    cfg = _cfg(method)
    seeds = [0, 3]
    batches = RandomWindows(TOKENS, seq_len=cfg.seq_len, batch=cfg.global_batch, seeds=seeds)
    val = fixed_windows(TOKENS, seq_len=cfg.seq_len, batch=2, num_batches=1)
    res = train_ensemble(cfg, seeds, batches, val, log=None)
    assert res.depth == cfg.depth
    for i, seed in enumerate(seeds):
        alone = _sequential(cfg, seed, RandomWindows(TOKENS, seq_len=cfg.seq_len,
                                                     batch=cfg.global_batch, seeds=[seed]))
        member = seed_model(res.params, res.static, i)
        for a, b in zip(jax.tree.leaves(eqx.filter(member, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(alone, eqx.is_array)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    # The two members really differ (different seeds, different batches).
    p0, p1 = (jax.tree.leaves(eqx.filter(seed_model(res.params, res.static, i), eqx.is_array))
              for i in (0, 1))
    assert not np.allclose(np.asarray(p0[0]), np.asarray(p1[0]))


def test_ensemble_records_per_seed_losses_and_logits_have_a_seed_axis():
    cfg = _cfg()
    seeds = [0, 1, 2]
    res = train_ensemble(cfg, seeds, RandomWindows(TOKENS, seq_len=cfg.seq_len,
                                                   batch=cfg.global_batch, seeds=seeds),
                         fixed_windows(TOKENS, seq_len=cfg.seq_len, batch=2, num_batches=2),
                         log=None)
    assert [r["step"] for r in res.history] == [3, 6, 9]
    sched = growth_schedule(cfg)  # the depth after `step` updates: that of update step - 1
    assert [r["depth"] for r in res.history] == [sched.stage_at(r["step"] - 1) + 1
                                                 for r in res.history]
    assert res.history[0]["depth"] < res.history[-1]["depth"] == 3
    assert all(len(r["val_loss"]) == 3 for r in res.history)
    logits = ensemble_logits(res.static)(res.params, jnp.zeros((4, cfg.seq_len), jnp.int32))
    assert logits.shape == (3, 4, cfg.seq_len, 256)
    one = seed_model(res.params, res.static, 2)(jnp.zeros((4, cfg.seq_len), jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[2]), np.asarray(one), rtol=1e-4, atol=1e-5)


def test_random_windows_are_a_function_of_seed_and_step():
    a = RandomWindows(TOKENS, seq_len=8, batch=3, seeds=[5, 7])
    b = RandomWindows(TOKENS, seq_len=8, batch=3, seeds=[7])
    assert (a(4)[1] == b(4)[0]).all() and not (a(4)[0] == a(4)[1]).all()
    assert not (a(4) == a(5)).all()
    with pytest.raises(ValueError, match="`tokens`"):
        RandomWindows(np.arange(5), seq_len=8, batch=1, seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        train_ensemble(_cfg(), [], a, fixed_windows(TOKENS, seq_len=8, batch=1, num_batches=1))
