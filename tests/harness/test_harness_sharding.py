"""FSDP shardings: the rule, direct sharded initialisation, and growth that keeps them."""



import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import stackops as so
from stackops_harness.config import preset
from stackops_harness.methods import growth_schedule
from stackops_harness.sharding import (
    DATA_AXIS,
    batch_sharding,
    check_divisible,
    fsdp_spec,
    make_mesh,
    shard_rows,
)
from stackops_harness.state import grow_state, init_state, make_optimizer, skeleton


def test_fsdp_rule_shards_the_largest_divisible_dimension_never_the_layer_axis():
    assert fsdp_spec((256, 128), 8, min_size=1024) == P(DATA_AXIS, None)
    assert fsdp_spec((128, 512), 8, min_size=1024) == P(None, DATA_AXIS)
    assert fsdp_spec((8, 100, 16), 8, min_size=1024, stacked=True) == P(None, None, DATA_AXIS)
    assert fsdp_spec((8, 100, 7), 8, min_size=1024, stacked=True) == P()  # nothing divides
    assert fsdp_spec((512,), 8, min_size=1024) == P()  # small: replicated
    assert fsdp_spec((256, 128), 1, min_size=1024) == P()  # one device
    assert fsdp_spec((256, 128), 8, min_size=0) == P()  # 0 disables


@pytest.mark.parametrize("method", ["midas", "looped"])
def test_params_start_sharded_and_growth_keeps_the_shardings(method):
    cfg = preset("smoke", d_model=64, n_heads=2, method=method, fsdp_min_size=4096)
    mesh = make_mesh()
    sched = growth_schedule(cfg)
    opt, _ = make_optimizer(cfg)
    sk = skeleton(cfg, sched, 0, mesh, opt)
    params, opt_state = init_state(cfg, sk, opt, sched.initial_depth)
    n = jax.device_count()

    def specs(tree):
        return [x.sharding.spec for x in jax.tree.leaves(tree)]

    assert specs(params) == [s.spec for s in jax.tree.leaves(sk.param_shardings)]
    if n > 1:
        # Big leaves are split (no device holds all of them), small ones replicated.
        wqkv = params.blocks.layers.attn.wqkv  # (1, 64, 192): 12288 elements
        assert wqkv.sharding.spec == P(None, None, DATA_AXIS)
        assert wqkv.addressable_shards[0].data.shape == (1, 64, 192 // n)
        assert params.blocks.layers.norm1.scale.sharding.spec == P()
        # Adam's moments are sharded like the parameters.
        assert opt_state[1][0].mu.blocks.layers.attn.wqkv.sharding.spec == P(None, None, DATA_AXIS)
    for stage in range(1, sched.num_stages):
        nxt = skeleton(cfg, sched, stage, mesh, opt)
        params, opt_state = grow_state(params, opt_state, sk, sched.ops[stage - 1], cfg, opt, nxt)
        sk = nxt
        assert specs(params) == [s.spec for s in jax.tree.leaves(sk.param_shardings)]
        assert specs(opt_state) == [s.spec for s in jax.tree.leaves(sk.opt_shardings)]
        for x in jax.tree.leaves(params.blocks):
            assert x.sharding.spec[0] is None if len(x.sharding.spec) else True
    assert len(sk.model(params).blocks) == 4
    if method == "looped":
        assert sk.model(params).blocks.num_layers == 1
    # The optimizer's step count is kept through growth (the LR schedule is global).
    counts = [x for x in jax.tree.leaves(opt_state) if x.ndim == 0]
    assert counts and all(int(c) == 0 for c in counts)


def test_batches_are_split_by_rows_over_the_data_axis():
    mesh = make_mesh()
    rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    x = shard_rows(rows, mesh)
    assert x.sharding == batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(x), rows)
    n = jax.device_count()
    assert {s.data.shape for s in x.addressable_shards} == {(8 // n, 5)}
    check_divisible(8, mesh, "global_batch")
    if n > 1:
        with pytest.raises(ValueError, match=f"global_batch=9 is not divisible.*{n} devices"):
            check_divisible(9, mesh, "global_batch")


def test_grown_shardings_match_what_stackops_grow_keeps():
    """stackops.grow itself keeps NamedShardings: growing the sharded model outside jit gives
    the shardings the harness computes for the next stage."""
    cfg = preset("smoke", d_model=64, n_heads=2, fsdp_min_size=4096)
    mesh = make_mesh()
    sched = growth_schedule(cfg)
    opt, _ = make_optimizer(cfg)
    sk = skeleton(cfg, sched, 0, mesh, opt)
    params, _ = init_state(cfg, sk, opt, sched.initial_depth)
    grown = so.grow(sk.model(params), sched.ops[0], where=lambda m: m.blocks)
    nxt = skeleton(cfg, sched, 1, mesh, opt)
    assert [x.sharding for x in jax.tree.leaves(grown)] == list(
        jax.tree.leaves(nxt.param_shardings)
    )
