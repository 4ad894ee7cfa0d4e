"""The training state: model and optimizer, built sharded, grown, stepped.

The state is `(params, opt_state)`: the model's arrays and the optax state, both sharded by
[`stackops_harness.sharding.fsdp_shardings`][]; the model's non-array part (`static`, which holds
the depth and a looped stack's routing) stays on the host. The functions here

- build the model at any stage *abstractly* (`eqx.filter_eval_shape`: no memory, no
  compute), which is the skeleton a checkpoint restores into and what the shardings are
  computed from;
- initialise the first stage directly sharded (`jax.jit(init, out_shardings=...)`: no full
  copy on one device);
- grow params and optimizer state across a stage boundary in one `jit` whose outputs keep
  the FSDP shardings;
- make the jitted train step (AdamW with warmup + cosine on the global step, gradient
  clipping), compiled ahead of time so that compile time is measured apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

import stackops as so
from stackops.models import AttentionFn, DecoderLM, LMConfig

from .attention import resolve_attention
from .config import TrainConfig
from .evaluate import next_token_loss
from .methods import GrowthSchedule
from .sharding import batch_sharding, fsdp_shardings, replicated, stacked_leaves

__all__ = [
    "blocks",
    "lm_config",
    "build_model",
    "make_optimizer",
    "is_param",
    "Skeleton",
    "skeleton",
    "check_schedule",
    "init_state",
    "grow_state",
    "make_train_step",
    "run_attention",
    "CompiledStage",
    "compile_stage",
]


def blocks(model: Any) -> Any:
    """The layer selector for `stackops.grow`: the model's `Stack` of blocks.

    !!! Example

        ```python
        import jax
        import stackops as so
        from stackops_harness.config import preset

        model = build_model(preset("smoke"), jax.random.key(0), 1)
        assert so.grow(model, so.middle_stack(block=1), where=blocks).depth == 2
        ```
    """
    return model.blocks


def is_param(x: Any) -> bool:
    """Array leaves of a concrete or abstract (`eval_shape`) model.

    !!! Example

        ```python
        import jax, jax.numpy as jnp

        assert is_param(jnp.zeros(2)) and is_param(jax.ShapeDtypeStruct((2,), jnp.float32))
        assert not is_param("static")
        ```
    """
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def lm_config(config: TrainConfig, depth: int) -> LMConfig:
    """The architecture of `config` at `depth` blocks.

    !!! Example

        ```python
        from stackops_harness.config import preset

        assert lm_config(preset("smoke"), 1).n_layers == 1
        ```
    """
    return config.model.lm_config(depth)


def build_model(config: TrainConfig, key: jax.Array, depth: int) -> DecoderLM:
    """A freshly initialised model of `depth` blocks.

    Output projections are initialised for the *final* depth (`config.depth`) whatever
    `depth` is, so a grown model and the baseline start from the same per-layer scales.

    !!! Example

        ```python
        import jax
        from stackops_harness.config import preset

        model = build_model(preset("smoke"), jax.random.key(0), 1)
        assert model.depth == 1
        ```
    """
    return DecoderLM(lm_config(config, depth), key=key, total_layers=config.depth)


def _decay_mask(params: Any) -> Any:
    # Decay matrices only, not norm scales and biases: a leaf's own rank, which inside a
    # Stack is one less than the stored array's (the leading layer axis).
    return jax.tree.map(lambda x, stacked: x.ndim - stacked >= 2, params, stacked_leaves(params))


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay on the global step, after gradient clipping.

    The schedule reads the optimizer state's step count, which growth keeps, so the
    learning rate is continuous across stages. Weight decay applies to matrices only.

    **Returns:** `(optimizer, schedule)`; `schedule(step)` is the learning rate.

    !!! Example

        ```python
        from stackops_harness.config import preset

        opt, schedule = make_optimizer(preset("smoke"))
        assert float(schedule(0)) == 0.0
        ```
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.lr * config.min_lr_ratio,
    )
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """The abstract state of one stage: shapes, dtypes and shardings, no arrays.

    **Attributes:**

    - `stage`: 0-based stage.
    - `depth`: block positions of the model.
    - `params`, `opt_state`: trees of `jax.ShapeDtypeStruct` carrying their shardings
      (what `orbax` restores into and what the train step is compiled for).
    - `static`: the model's non-array part.
    - `param_shardings`, `opt_shardings`: the `NamedSharding` trees.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule
        from stackops_harness.sharding import make_mesh

        cfg = preset("smoke")
        sk = skeleton(cfg, growth_schedule(cfg), 1, make_mesh(), make_optimizer(cfg)[0])
        assert sk.depth == 2 and sk.params.blocks.layers.attn.wqkv.shape == (2, 32, 96)
        ```
    """

    stage: int
    depth: int
    params: Any
    opt_state: Any
    static: Any
    param_shardings: Any
    opt_shardings: Any

    def model(self, params: Any) -> DecoderLM:
        """The model made of `params` and this stage's static part."""
        return eqx.combine(params, self.static)


def _abstract_model(config: TrainConfig, schedule: GrowthSchedule, stage: int) -> DecoderLM:
    def build() -> DecoderLM:
        model = build_model(config, jax.random.key(config.seed), schedule.initial_depth)
        for op in schedule.ops[:stage]:
            model = so.grow(model, op, where=blocks)
        return model

    return eqx.filter_eval_shape(build)


def skeleton(
    config: TrainConfig,
    schedule: GrowthSchedule,
    stage: int,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
) -> Skeleton:
    """The abstract state at `stage`: the initial model grown through the first `stage`
    operators of `schedule`, traced only (no memory, no compute).

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule
        from stackops_harness.sharding import make_mesh

        cfg = preset("smoke")
        sk = skeleton(cfg, growth_schedule(cfg), 2, make_mesh(), make_optimizer(cfg)[0])
        assert sk.depth == 3
        ```
    """
    if not 0 <= stage < schedule.num_stages:
        raise ValueError(f"stage must lie in 0..{schedule.num_stages - 1}, got {stage}.")
    model = _abstract_model(config, schedule, stage)
    params, static = eqx.partition(model, is_param)
    p_sh = fsdp_shardings(params, mesh, min_size=config.fsdp_min_size)
    opt_abs = jax.eval_shape(optimizer.init, params)
    o_sh = fsdp_shardings(opt_abs, mesh, min_size=config.fsdp_min_size)
    with_sh = lambda t, s: jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s
    )
    return Skeleton(
        stage=stage,
        depth=model.depth,
        params=with_sh(params, p_sh),
        opt_state=with_sh(opt_abs, o_sh),
        static=static,
        param_shardings=p_sh,
        opt_shardings=o_sh,
    )


def check_schedule(config: TrainConfig, schedule: GrowthSchedule) -> tuple[int, ...]:
    """Dry-run the growth schedule on the abstract model; return the depth of each stage.

    Fails before any training when the method cannot grow this model as configured: an
    operator that does not fit the depth, `preserve` with weight-tying operators, or a
    method whose last stage does not reach `config.depth`.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule

        cfg = preset("smoke")
        assert check_schedule(cfg, growth_schedule(cfg)) == (1, 2, 3, 4)
        ```
    """
    preserve = True if config.preserve else None

    def run() -> list[DecoderLM]:
        model = build_model(config, jax.random.key(config.seed), schedule.initial_depth)
        out = [model]
        for op in schedule.ops:
            model = so.grow(model, op, where=blocks, preserve=preserve)
            out.append(model)
        return out

    try:
        models = eqx.filter_eval_shape(run)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"method {config.method!r} cannot grow this model ({len(schedule.ops)} boundaries, "
            f"starting from {schedule.initial_depth} blocks): {e}"
        ) from e
    depths = tuple(m.depth for m in models)
    if depths[-1] != config.depth:
        raise ValueError(
            f"method {config.method!r} grows the model through depths {list(depths)}, so its "
            f"last stage has {depths[-1]} blocks, not TrainConfig.depth={config.depth}. Use an "
            f"operator that adds depth/stages = {config.block} blocks per stage, or change "
            "depth/stages."
        )
    return depths


def init_state(
    config: TrainConfig, sk: Skeleton, optimizer: optax.GradientTransformation, depth: int
) -> tuple[Any, Any]:
    """Initialise the first stage's params and optimizer state directly sharded.

    `jax.jit` with `out_shardings` creates every shard on its own device: no device ever
    holds the whole model.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule
        from stackops_harness.sharding import make_mesh

        cfg = preset("smoke")
        schedule, (optimizer, _) = growth_schedule(cfg), make_optimizer(cfg)
        sk = skeleton(cfg, schedule, 0, make_mesh(), optimizer)
        params, opt_state = init_state(cfg, sk, optimizer, schedule.initial_depth)
        assert params.embed.sharding == sk.param_shardings.embed
        ```
    """

    def init(key: jax.Array) -> Any:
        return eqx.filter(build_model(config, key, depth), eqx.is_array)

    params = jax.jit(init, out_shardings=sk.param_shardings)(jax.random.key(config.seed))
    opt_state = jax.jit(optimizer.init, out_shardings=sk.opt_shardings)(params)
    return params, opt_state


def grow_state(
    params: Any,
    opt_state: Any,
    sk: Skeleton,
    op: so.AbstractGrowth,
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    next_sk: Skeleton,
) -> tuple[Any, Any]:
    """Grow params and optimizer state into the next stage, inside one `jit`.

    The model grows with `stackops.grow` (function-preservingly with `config.preserve`),
    the optimizer state with `stackops.grow_opt_state` under `config.opt_policy`; the step
    count is kept. Outputs come out with the next stage's FSDP shardings.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule
        from stackops_harness.sharding import make_mesh

        cfg, mesh = preset("smoke"), make_mesh()
        schedule, (optimizer, _) = growth_schedule(cfg), make_optimizer(cfg)
        sk, next_sk = (skeleton(cfg, schedule, s, mesh, optimizer) for s in (0, 1))
        params, opt_state = init_state(cfg, sk, optimizer, schedule.initial_depth)
        params, opt_state = grow_state(
            params, opt_state, sk, schedule.ops[0], cfg, optimizer, next_sk
        )
        assert next_sk.model(params).depth == 2
        ```
    """
    preserve = True if config.preserve else None

    def fn(p: Any, o: Any) -> tuple[Any, Any]:
        model = eqx.combine(p, sk.static)
        grown = so.grow(model, op, where=blocks, preserve=preserve)
        new_o = so.grow_opt_state(
            optimizer,
            o,
            op,
            where=blocks,
            params=p,
            policy=config.opt_policy,  # type: ignore[arg-type]
        )
        return eqx.filter(grown, eqx.is_array), new_o

    out = jax.jit(fn, out_shardings=(next_sk.param_shardings, next_sk.opt_shardings))
    return out(params, opt_state)


def run_attention(config: TrainConfig, mesh: Mesh) -> tuple[str, AttentionFn | None]:
    """The attention core `config.attention` resolves to on `mesh`: `(name, function)`.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.sharding import make_mesh

        name, fn = run_attention(preset("smoke", attention="xla"), make_mesh())
        assert (name, fn) == ("xla", None)
        ```
    """
    return resolve_attention(
        config.attention,
        compute_dtype=config.compute_dtype,
        head_dim=config.d_model // config.n_heads,
        mesh=mesh,
    )


def make_train_step(
    config: TrainConfig,
    sk: Skeleton,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    attention: AttentionFn | None = None,
) -> jax.stages.Wrapped:
    """The jitted train step of one stage: `(params, opt_state, tokens) -> (params,
    opt_state, {"loss", "grad_norm"})`, donating the old state. The attention core is
    the one `config.attention` resolves to on `mesh` (`stackops_harness.attention`),
    unless `attention` gives another [`AttentionFn`][stackops.models.AttentionFn].

    Call `.lower(sk.params, sk.opt_state, tokens_spec).compile()` on it to compile ahead of
    time (and time compilation apart from training).

    !!! Example

        ```python
        import numpy as np
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule
        from stackops_harness.sharding import make_mesh, shard_rows

        cfg, mesh = preset("smoke"), make_mesh()
        schedule, (optimizer, _) = growth_schedule(cfg), make_optimizer(cfg)
        sk = skeleton(cfg, schedule, 0, mesh, optimizer)
        params, opt_state = init_state(cfg, sk, optimizer, schedule.initial_depth)
        tokens = shard_rows(np.zeros((cfg.global_batch, cfg.seq_len + 1), np.int32), mesh)
        step = make_train_step(cfg, sk, optimizer, mesh)
        params, opt_state, metrics = step(params, opt_state, tokens)
        assert metrics["loss"].shape == ()
        ```
    """
    static = sk.static
    if attention is None:
        _, attention = run_attention(config, mesh)

    def step(params: Any, opt_state: Any, tokens: jax.Array):
        def loss_fn(p: Any) -> jax.Array:
            model = eqx.combine(p, static)
            return next_token_loss(
                model,
                tokens,
                compute_dtype=config.compute_dtype,
                unroll=config.unroll,
                attention=attention,
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads).astype(jnp.float32)}
        return params, opt_state, metrics

    return jax.jit(
        step,
        in_shardings=(sk.param_shardings, sk.opt_shardings, batch_sharding(mesh)),
        out_shardings=(sk.param_shardings, sk.opt_shardings, replicated(mesh)),
        donate_argnums=(0, 1),
    )


@dataclasses.dataclass(frozen=True)
class CompiledStage:
    """One stage's train step, compiled ahead of time, and a fresh state to run it on.

    **Attributes:**

    - `step`: the compiled `(params, opt_state, tokens) -> (params, opt_state, metrics)`
      of [`make_train_step`][] (`metrics`: `"loss"`, `"grad_norm"`); it donates the state
      passed in, so keep the returned one.
    - `params`, `opt_state`: the initial state, sharded as `skeleton` says.
    - `skeleton`: the stage's [`Skeleton`][] (`skeleton.model(params)` is the model).
    - `attention`: the attention core's name (see `stackops_harness.attention`).
    - `tokens`: the `ShapeDtypeStruct` of a batch, `(global_batch, seq_len + 1)` int32
      split by rows over the mesh (`stackops_harness.sharding.shard_rows` makes one).
    """

    step: Any
    params: Any
    opt_state: Any
    skeleton: Skeleton
    attention: str
    tokens: jax.ShapeDtypeStruct


def compile_stage(
    config: TrainConfig, depth: int, mesh: Mesh, *, attention: AttentionFn | None = None
) -> CompiledStage:
    """Compile the trainer's train step for the model of `config` at `depth` blocks.

    The step, optimizer, shardings and initialisation are the trainer's (a stage of
    `depth` blocks of the `config.method="baseline"` run when `depth == config.depth`):
    what benchmarks and profilers should time instead of a copy of the model.

    **Arguments:**

    - `config`: the run's config (its `depth` sets the initial output scales, as in a run).
    - `depth`: blocks of the stage's model (>= 1).
    - `mesh`: the device mesh (`stackops_harness.sharding.make_mesh()`).
    - `attention`: an [`AttentionFn`][stackops.models.AttentionFn] replacing the core that
      `config.attention` resolves to (e.g. for a diagnostic).

    **Returns:** a [`CompiledStage`][].

    !!! Example

        ```python
        import numpy as np
        from stackops_harness.config import preset
        from stackops_harness.sharding import make_mesh, shard_rows

        cfg, mesh = preset("smoke"), make_mesh()
        stage = compile_stage(cfg, 2, mesh)
        assert stage.skeleton.depth == 2
        tokens = shard_rows(np.zeros(stage.tokens.shape, np.int32), mesh)
        params, opt_state, metrics = stage.step(stage.params, stage.opt_state, tokens)
        assert metrics["loss"].shape == ()
        ```
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"compile_stage: `depth` must be a positive int, got {depth!r}.")
    schedule = GrowthSchedule((config.total_steps,), (), depth)
    optimizer, _ = make_optimizer(config)
    sk = skeleton(config, schedule, 0, mesh, optimizer)
    params, opt_state = init_state(config, sk, optimizer, depth)
    if attention is None:
        name, attention = run_attention(config, mesh)
    else:
        name = getattr(attention, "__name__", type(attention).__name__)
    tokens = jax.ShapeDtypeStruct(
        (config.global_batch, config.seq_len + 1), jnp.int32, sharding=batch_sharding(mesh)
    )
    step = make_train_step(config, sk, optimizer, mesh, attention=attention)
    compiled = step.lower(sk.params, sk.opt_state, tokens).compile()
    return CompiledStage(compiled, params, opt_state, sk, name, tokens)
