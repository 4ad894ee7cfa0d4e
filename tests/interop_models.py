"""Small models in other libraries' containers, each with a way to read its layers back.

Every builder returns a `Case`: the model, `where`, a function listing each position's
arrays (read with the library's own API, independently of stackops), and a function running
the model on a probe input. Random init only; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

D, H = 4, 6


@dataclasses.dataclass
class Case:
    model: Any
    where: Callable[[Any], Any]
    positions: Callable[[Any], list[list[np.ndarray]]]  # per position: its arrays
    run: Callable[[Any], Any] | None
    preserve: Any = None
    axis: int = 0
    params: Callable[[Any], Any] = lambda m: m  # what an optax optimizer sees
    supports_opt: bool = True
    state_where: Callable[[Any], Any] | None = None  # `where` on what the optimizer sees


def _np(xs):
    return [np.asarray(x) for x in xs]


# ----- plain pytrees with a layer axis (Flax linen nn.scan: axis 0; MaxText: axis 1) -----


def axis_dict(n: int, axis: int, seed: int = 0) -> Case:
    k = jax.random.split(jax.random.key(seed), 4)
    w1 = jax.random.normal(k[0], (n, D, H)) / 2
    b1 = 0.1 * jax.random.normal(k[1], (n, H))
    w2 = jax.random.normal(k[2], (n, H, D)) / 2
    b2 = 0.1 * jax.random.normal(k[3], (n, D))
    layers = {"mlp": {"wi": w1, "bi": b1, "wo": w2, "bo": b2}}
    layers = jax.tree.map(lambda a: jnp.moveaxis(a, 0, axis), layers)
    params = {"params": {"decoder": {"layers": layers}, "embed": jnp.ones((D, D))}}

    def per_layer(p):
        lay = jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), p["params"]["decoder"]["layers"])
        n_ = lay["mlp"]["wi"].shape[0]
        return [
            _np([lay["mlp"][k][i] for k in ("bi", "bo", "wi", "wo")]) for i in range(n_)
        ]

    def run(p):
        x = jnp.linspace(-1.0, 1.0, 3 * D).reshape(3, D) @ p["params"]["embed"]
        lay = jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), p["params"]["decoder"]["layers"])

        def body(h, m):
            return h + jax.nn.relu(h @ m["wi"] + m["bi"]) @ m["wo"] + m["bo"], None

        return jax.lax.scan(body, x, lay["mlp"])[0]

    return Case(
        params,
        lambda p: p["params"]["decoder"]["layers"],
        per_layer,
        run,
        preserve=lambda lay: (lay["mlp"]["wo"], lay["mlp"]["bo"]),
        axis=axis,
    )


# ----- haliax Stacked -----


def haliax_stacked(n: int, seed: int = 0) -> Case:
    import equinox as eqx
    import haliax as hax
    import haliax.nn as hnn

    Layer, Dax, Hax = hax.Axis("layer", n), hax.Axis("d", D), hax.Axis("h", H)

    class Blk(eqx.Module):
        up: hnn.Linear
        down: hnn.Linear

        @staticmethod
        def init(*, key):
            k1, k2 = jax.random.split(key)
            return Blk(hnn.Linear.init(Dax, Hax, key=k1), hnn.Linear.init(Hax, Dax, key=k2))

        def __call__(self, x):
            return x + self.down(hax.nn.relu(self.up(x)))

    class Model(eqx.Module):
        blocks: hnn.Stacked

    model = Model(hnn.Stacked.init(Layer, Blk)(key=jax.random.split(jax.random.key(seed), n)))

    def per_layer(m):
        out = []
        for i in range(m.blocks.Block.size):
            layer = m.blocks.get_layer(i)
            out.append(_np([x.array for x in jax.tree.leaves(layer, is_leaf=_is_named)]))
        return out

    def run(m):
        x = hax.named(jnp.linspace(-1.0, 1.0, 3 * D).reshape(3, D), ("batch", "d"))
        return m.blocks.fold(x).array

    return Case(
        model,
        lambda m: m.blocks,
        per_layer,
        run,
        preserve=lambda s: (s.down.weight, s.down.bias),
    )


def _is_named(x):
    import haliax as hax

    return isinstance(x, hax.NamedArray)


# ----- penzai Sequential / LayerStack -----


def _penzai_block(name: str, init_base_rng):
    from penzai import pz

    return pz.nn.Residual(
        pz.nn.Sequential(
            [
                pz.nn.Affine.from_config(
                    name=f"{name}.up",
                    init_base_rng=init_base_rng,
                    input_axes={"d": D},
                    output_axes={"h": H},
                ),
                pz.nn.Elementwise(jax.nn.relu),
                pz.nn.Affine.from_config(
                    name=f"{name}.down",
                    init_base_rng=init_base_rng,
                    input_axes={"h": H},
                    output_axes={"d": D},
                    bias_initializer=_normal_bias,
                ),
            ]
        )
    )


def _normal_bias(key, input_axes, output_axes, parallel_axes, convolution_spatial_axes, dtype):
    from penzai import pz

    shape = {**output_axes}
    return pz.nx.wrap(0.1 * jax.random.normal(key, tuple(shape.values()), dtype), *shape)


def _penzai_values(tree) -> list[np.ndarray]:
    from penzai import pz

    frozen = pz.freeze_variables(tree)
    vals = (
        pz.select(frozen).at_instances_of(pz.ParameterValue).get_sequence()
    )
    return [np.asarray(v.value.canonicalize().data_array) for v in vals]


def _penzai_run(layer):
    from penzai import pz

    x = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 3 * D).reshape(3, D), "batch", "d")
    return np.asarray(layer(x).canonicalize().data_array)


def _pz_out_leaves(block):

    down = block.delta.sublayers[2]
    return (down.sublayers[0].weights, down.sublayers[1].bias)


def penzai_sequential(n: int, seed: int = 0) -> Case:
    from penzai import pz

    keys = jax.random.split(jax.random.key(seed), n)
    model = pz.nn.Sequential([_penzai_block(f"block{i}", keys[i]) for i in range(n)])
    return Case(
        model,
        lambda m: m,
        lambda m: [_penzai_values(layer) for layer in m.sublayers],
        _penzai_run,
        preserve=_pz_out_leaves,
        supports_opt=False,
    )


def penzai_layer_stack(n: int, seed: int = 0) -> Case:
    from penzai import pz

    model = pz.nn.LayerStack.from_sublayer_builder(
        builder=_penzai_block,
        stack_axis="layer",
        stack_axis_size=n,
        init_base_rng=jax.random.key(seed),
        builder_kwargs={"name": "block"},
    )

    def per_layer(m):
        vals = _penzai_values_named(m)
        return [[np.asarray(v[{"layer": i}].canonicalize().data_array) for v in vals] for i in
                range(m.stack_axis_size)]

    return Case(model, lambda m: m, per_layer, _penzai_run, supports_opt=False)


def _penzai_values_named(tree):
    from penzai import pz

    frozen = pz.freeze_variables(tree)
    return [v.value for v in pz.select(frozen).at_instances_of(pz.ParameterValue).get_sequence()]


# ----- Flax NNX -----


def nnx_list(n: int, seed: int = 0) -> Case:
    from flax import nnx

    class Blk(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(D, H, rngs=rngs)
            self.down = nnx.Linear(H, D, rngs=rngs, bias_init=nnx.initializers.normal(0.1))
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # holds a typed PRNG key

        def __call__(self, x):
            return x + self.drop(self.down(jax.nn.relu(self.up(x))), deterministic=True)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Blk(rngs) for _ in range(n)])

        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Model(nnx.Rngs(seed))

    def per_layer(m):
        return [
            _np([x for x in jax.tree.leaves(nnx.state(b, nnx.Param))]) for b in m.blocks
        ]

    def run(m):
        return m(jnp.linspace(-1.0, 1.0, 3 * D).reshape(3, D))

    return Case(
        model,
        lambda m: m.blocks,
        per_layer,
        run,
        preserve=lambda b: (b.down.kernel, b.down.bias),
        params=lambda m: nnx.state(m, nnx.Param),
        state_where=lambda s: s["blocks"],
    )
