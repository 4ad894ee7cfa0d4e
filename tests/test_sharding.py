"""Growth keeps shardings: a sharded model grows into a sharded model (8 simulated devices)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import stackops as so
from stackops.models import DecoderLM, LMConfig

try:  # jax >= 0.5 has explicit mesh axes; the tests use automatic ones
    from jax.sharding import AxisType

    def _auto(n: int) -> dict:
        return {"axis_types": (AxisType.Auto,) * n}

except ImportError:  # older jax (the floor version): every mesh axis is automatic

    def _auto(n: int) -> dict:
        return {}


pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


def _shard(model, mesh):
    """FSDP-style: shard the last axis of every matrix over 'data', replicate vectors."""

    def spec(x):
        if x.ndim >= 2 and x.shape[-1] % mesh.shape["data"] == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "data"))
        return NamedSharding(mesh, P())

    return jax.tree.map(lambda x: jax.device_put(x, spec(x)) if eqx.is_array(x) else x, model)


@pytest.mark.parametrize(
    "op",
    [
        so.middle_stack(block=1),
        so.last_stack(block=2),
        so.interpolate(block=1),
        so.loop_tie(block=1),
    ],
    ids=repr,
)
def test_shardings_survive_growth_without_gathering(op):
    mesh = jax.make_mesh((8,), ("data",), **_auto(1))
    cfg = LMConfig(d_model=32, n_heads=2, n_layers=4, max_len=8)
    model = _shard(DecoderLM(cfg, key=jax.random.key(0)), mesh)
    grown = so.grow(model, op, where=lambda m: m.blocks)
    old_leaves = jax.tree.leaves(model.blocks.layers)
    new_leaves = jax.tree.leaves(grown.blocks.layers)
    for old, new in zip(old_leaves, new_leaves):
        assert new.sharding.is_equivalent_to(old.sharding, new.ndim), (old.sharding, new.sharding)
        if old.ndim >= 2:
            # Each device holds only its slice: nothing was gathered onto one device.
            shard_shape = new.addressable_shards[0].data.shape
            assert shard_shape[-1] == new.shape[-1] // 8
    tokens = jnp.zeros((2, 8), jnp.int32)
    assert np.isfinite(np.asarray(grown(tokens))).all()


def test_sharded_optimizer_state_grows_with_the_same_shardings():
    mesh = jax.make_mesh((8,), ("data",), **_auto(1))
    cfg = LMConfig(d_model=32, n_heads=2, n_layers=2, max_len=8)
    model = _shard(DecoderLM(cfg, key=jax.random.key(0)), mesh)
    opt = optax.adamw(1e-3)
    params = eqx.filter(model, eqx.is_inexact_array)
    state = jax.jit(opt.init)(params)
    op = so.middle_stack(block=1)
    new_state = so.grow_opt_state(opt, state, op, where=lambda m: m.blocks, params=model)
    for old, new in zip(
        jax.tree.leaves(state[0].mu.blocks.layers), jax.tree.leaves(new_state[0].mu.blocks.layers)
    ):
        assert new.sharding.is_equivalent_to(old.sharding, new.ndim)


def test_layer_axis_sharding_falls_back_when_the_new_depth_does_not_divide():
    mesh = jax.make_mesh((2, 4), ("layers", "data"), **_auto(2))
    w = jax.device_put(
        jnp.arange(2 * 8 * 8.0).reshape(2, 8, 8), NamedSharding(mesh, P("layers", None, "data"))
    )
    s = so.Stack(w)
    grown = so.grow(s, so.middle_stack(block=1), where=lambda t: t)  # depth 2 -> 3
    assert grown.layers.sharding.spec == P(None, None, "data")
    np.testing.assert_array_equal(np.asarray(grown.layers[1]), np.asarray(w[0]))
