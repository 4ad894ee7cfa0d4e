"""The language-modelling loss, and validation loss on a fixed held-out set.

The loss is the mean next-token cross-entropy (in nats) over every position of a batch of
rows of `seq_len + 1` tokens: inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`.
Validation uses the same fixed batches (`stackops_harness.data.make_eval_batches`) for the whole run
and for every run, so curves compare across methods and stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from stackops.models import AttentionFn

from .sharding import batch_sharding, fsdp_shardings, local_rows, make_mesh, replicated, shard_rows

__all__ = ["next_token_loss", "make_eval_step", "EvalSet", "evaluate_model"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def next_token_loss(
    model: Any,
    tokens: Int[Array, "B T1"],
    *,
    compute_dtype: str = "float32",
    unroll: int = 0,
    attention: AttentionFn | None = None,
) -> Float[Array, ""]:
    """Mean next-token cross-entropy of `model` on rows of `T + 1` tokens.

    **Arguments:**

    - `model`: a [`stackops.models.DecoderLM`][] (anything called as
      `model(tokens, compute_dtype=..., unroll=...)` returning logits).
    - `tokens`: int array `(B, T + 1)`.
    - `compute_dtype`: `"float32"` or `"bfloat16"` matmuls (logits and loss are float32).
    - `unroll`: blocks per scan iteration; 0 unrolls them all.
    - `attention`: the attention core (`None`: the model's default, XLA's); see
      `stackops_harness.attention.resolve_attention`.

    **Returns:** a float32 scalar, in nats per token.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        from stackops.models import DecoderLM, LMConfig

        cfg = LMConfig(d_model=32, n_heads=2, n_layers=1, max_len=8)
        model = DecoderLM(cfg, key=jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
        loss = next_token_loss(model, tokens)
        assert abs(float(loss) - jnp.log(256)) < 0.1   # an untrained model is near uniform
        ```
    """
    logits = model(
        tokens[:, :-1],
        compute_dtype=DTYPES[compute_dtype],
        unroll=True if unroll == 0 else unroll,
        attention=attention,
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.mean(losses)


def make_eval_step(
    static: Any,
    param_shardings: Any,
    mesh: Mesh,
    *,
    compute_dtype: str = "float32",
    unroll: int = 0,
    attention: AttentionFn | None = None,
) -> jax.stages.Wrapped:
    """A jitted `(params, tokens) -> loss` for the model whose non-array part is `static`.

    Parameters arrive with `param_shardings`, tokens split by rows over the data axis; the
    loss comes back replicated.

    !!! Example

        ```python
        import equinox as eqx, jax, numpy as np
        from stackops.models import DecoderLM, LMConfig
        from stackops_harness.sharding import fsdp_shardings, make_mesh, shard_rows

        cfg = LMConfig(d_model=32, n_heads=2, n_layers=1, max_len=8)
        model = DecoderLM(cfg, key=jax.random.key(0))
        mesh = make_mesh()
        params, static = eqx.partition(model, eqx.is_array)
        step = make_eval_step(static, fsdp_shardings(params, mesh), mesh)
        loss = step(params, shard_rows(np.zeros((8, 9), np.int32), mesh))
        ```
    """

    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        model = eqx.combine(params, static)
        return next_token_loss(
            model, tokens, compute_dtype=compute_dtype, unroll=unroll, attention=attention
        )

    return jax.jit(
        loss,
        in_shardings=(param_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


class EvalSet:
    """Fixed held-out batches placed on the mesh once, evaluated as one mean loss.

    **Arguments:**

    - `batches`: the global batches (each `(rows, seq_len + 1)`, the same in every process),
      e.g. from `stackops_harness.data.make_eval_batches`.
    - `mesh`: the mesh; each process keeps only its own rows.

    !!! Example

        ```python
        import numpy as np
        from stackops_harness import data
        from stackops_harness.sharding import make_mesh

        batches = data.make_eval_batches(np.arange(1000) % 256, seq_len=8, batch=8, num_batches=2)
        evals = EvalSet(batches, make_mesh())
        assert evals.num_tokens == 2 * 8 * 8
        # val_loss = evals.loss(eval_step, params)   with a step from make_eval_step
        ```
    """

    def __init__(self, batches: Sequence[np.ndarray], mesh: Mesh):
        if not batches:
            raise ValueError("EvalSet: `batches` is empty; give at least one batch.")
        self.num_tokens = sum(int(b.shape[0]) * (int(b.shape[1]) - 1) for b in batches)
        self.batches = [shard_rows(local_rows(np.asarray(b)), mesh) for b in batches]

    def loss(self, eval_step: Callable[[Any, jax.Array], jax.Array], params: Any) -> float:
        """The mean loss over all batches (every batch has the same shape, so the mean of
        means is the mean over tokens)."""
        total = sum(eval_step(params, b) for b in self.batches)
        return float(total) / len(self.batches)


def evaluate_model(
    model: Any,
    batches: Sequence[np.ndarray],
    *,
    compute_dtype: str = "float32",
    unroll: int = 0,
    mesh: Mesh | None = None,
    fsdp_min_size: int = 2**14,
    attention: AttentionFn | None = None,
) -> float:
    """Validation loss of any model on fixed batches (e.g. a model from `load_checkpoint`).

    **Arguments:**

    - `model`: the model to evaluate.
    - `batches`: global batches of `(rows, seq_len + 1)` tokens.
    - `compute_dtype`, `unroll`: as in training.
    - `mesh`: the mesh to run on (default: all devices).
    - `fsdp_min_size`: as `TrainConfig.fsdp_min_size`.
    - `attention`: the attention core (`None`: XLA's); see `stackops_harness.attention`.

    **Returns:** the mean next-token loss in nats.

    !!! Example

        ```python
        import jax, numpy as np
        from stackops.models import DecoderLM, LMConfig
        from stackops_harness import data

        cfg = LMConfig(d_model=32, n_heads=2, n_layers=1, max_len=8)
        model = DecoderLM(cfg, key=jax.random.key(0))
        batches = data.make_eval_batches(np.arange(1000) % 256, seq_len=8, batch=8, num_batches=2)
        assert 5.0 < evaluate_model(model, batches) < 6.0   # untrained: about log(256)
        ```
    """
    mesh = mesh or make_mesh()
    params, static = eqx.partition(model, eqx.is_array)
    shardings = fsdp_shardings(params, mesh, min_size=fsdp_min_size)
    params = jax.device_put(params, shardings)
    step = make_eval_step(
        static, shardings, mesh, compute_dtype=compute_dtype, unroll=unroll, attention=attention
    )
    return EvalSet(batches, mesh).loss(step, params)
