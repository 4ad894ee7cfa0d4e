"""N seeds of one method trained as one vmapped program.

Many small runs that differ only in their seed are one program with a leading seed axis on
every parameter, optimizer moment and batch: [`train_ensemble`][] initialises the seeds'
models with `eqx.filter_vmap`, takes every train step as one `jax.vmap`-ed step (each seed
on its own batch), and grows all seeds at once at a stage boundary with `jax.vmap` over
`stackops.grow` and `stackops.grow_opt_state` (the layer axis is then axis 1 of each
seed-batched leaf). Seed `s` of the ensemble computes what a run of seed `s` alone computes
with the same config and batches (`tests/harness/test_ensemble.py` checks it to float
tolerance), so statistics over seeds are unchanged while small models fill a large device.

Data comes from NumPy token arrays ([`RandomWindows`][]): nothing here imports grain or
orbax, so the module runs on a machine with only JAX, Equinox and optax.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import stackops as so
from stackops.models import flops_per_token

from .config import TrainConfig
from .evaluate import next_token_loss
from .methods import growth_schedule
from .state import blocks, build_model, lm_config, make_optimizer

__all__ = ["RandomWindows", "fixed_windows", "EnsembleResult", "train_ensemble",
           "ensemble_logits", "seed_model"]


class RandomWindows:
    """Seed-batched training batches: random windows of a token array, one stream per seed.

    Batch `step` of seed `s` depends only on `(s, step)`, so seed `s` in any ensemble gets
    the same batches as seed `s` alone.

    **Arguments:**

    - `tokens`: 1-D token ids (e.g. from `stackops_harness.corpus.mixed_corpus_tokens`).
    - `seq_len`: tokens per row are `seq_len + 1` (inputs and shifted targets).
    - `batch`: rows per seed and step.
    - `seeds`: the data seeds, one per ensemble member.

    !!! Example

        ```python
        import numpy as np
        from stackops_harness.ensemble import RandomWindows

        w = RandomWindows(np.arange(1000) % 256, seq_len=8, batch=2, seeds=[0, 1])
        assert w(0).shape == (2, 2, 9)
        assert (w(5)[1] == RandomWindows(np.arange(1000) % 256, seq_len=8, batch=2,
                                         seeds=[1])(5)[0]).all()
        ```
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch: int, seeds: Sequence[int]):
        self.tokens = np.asarray(tokens).astype(np.int32)
        if self.tokens.ndim != 1 or self.tokens.size <= seq_len + 1:
            raise ValueError(f"`tokens` must be 1-D and longer than seq_len + 1 = {seq_len + 1}.")
        if batch < 1 or seq_len < 1 or not len(seeds):
            raise ValueError("`batch` and `seq_len` must be >= 1 and `seeds` non-empty.")
        self.seq_len, self.batch, self.seeds = seq_len, batch, [int(s) for s in seeds]
        self._cols = np.arange(seq_len + 1)

    def __call__(self, step: int) -> np.ndarray:
        hi = self.tokens.size - self.seq_len - 1
        starts = np.stack([np.random.default_rng([s, step]).integers(0, hi, size=self.batch)
                           for s in self.seeds])
        return self.tokens[starts[..., None] + self._cols]


def fixed_windows(tokens: np.ndarray, *, seq_len: int, batch: int, num_batches: int) -> np.ndarray:
    """Evenly spaced validation windows, the same for every seed: `(num_batches, batch,
    seq_len + 1)` int32.

    !!! Example

        ```python
        import numpy as np
        from stackops_harness.ensemble import fixed_windows

        assert fixed_windows(np.arange(1000), seq_len=8, batch=2, num_batches=3).shape == (3, 2, 9)
        ```
    """
    tokens = np.asarray(tokens).astype(np.int32)
    n = num_batches * batch
    if tokens.size < seq_len + 2:
        raise ValueError("`tokens` is shorter than one window.")
    starts = np.linspace(0, tokens.size - seq_len - 1, n).astype(np.int64)
    return tokens[starts[:, None] + np.arange(seq_len + 1)].reshape(num_batches, batch, -1)


@dataclasses.dataclass
class EnsembleResult:
    """What [`train_ensemble`][] returns.

    - `params`, `static`: the seed-batched parameters and the shared non-array part
      (`eqx.combine(params, static)` is the batched model; see [`seed_model`][]).
    - `seeds`, `depth`: the seeds and the final depth.
    - `history`: evaluation records (step, stage, depth, per-seed `val_loss`, FLOPs,
      times, and whatever `on_eval` added).
    - `seconds`: wall time by activity (`compile`, `train`, `grow`, `eval`).
    """

    params: Any
    static: Any
    seeds: list[int]
    depth: int
    history: list[dict[str, Any]]
    seconds: dict[str, float]


def seed_model(params: Any, static: Any, index: int) -> Any:
    """Member `index` of a seed-batched ensemble as an ordinary model.

    !!! Example

        ```python
        # model0 = seed_model(result.params, result.static, 0)
        ```
    """
    return eqx.combine(jax.tree.map(lambda x: x[index], params), static)


@eqx.filter_jit
def _batched_logits(model: Any, tokens: jax.Array) -> jax.Array:
    # filter_jit caches on the model's structure, so every evaluation of every method at a
    # given depth reuses one compilation.
    return eqx.filter_vmap(lambda m: m(tokens))(model)


def ensemble_logits(static: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted `(params, tokens_BxT) -> logits (S, B, T, V)`: every member on the same rows.

    !!! Example

        ```python
        # logits = ensemble_logits(result.static)(result.params, tokens)
        ```
    """
    return lambda params, tokens: _batched_logits(eqx.combine(params, static), tokens)


# Compiled train steps by everything that determines them (the config without its method and
# seeds, the model's structure and shapes, the batch shape): GradStack and MIDAS reach the
# same depths with the same structure, so the second method compiles nothing.
_STEPS: dict[Any, Any] = {}


def _step_key(config: TrainConfig, params: Any, static: Any, batch_shape: tuple) -> Any:
    from .config import config_to_flat_dict

    cfg = {k: v for k, v in config_to_flat_dict(config).items()
           if k not in ("method", "seed", "data_seed", "progress", "data_dir")}
    shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(params))
    return (repr(sorted(cfg.items())), jax.tree.structure(eqx.combine(params, static)),
            shapes, batch_shape)


def _eval_steps(config: TrainConfig) -> set[int]:
    every = config.eval_every if config.eval_every > 0 else config.total_steps
    return set(range(every, config.total_steps + 1, every)) | {config.total_steps}


def train_ensemble(
    config: TrainConfig,
    seeds: Sequence[int],
    train_batches: Callable[[int], np.ndarray],
    val_batches: np.ndarray,
    *,
    on_eval: Callable[[int, Any, Any, dict[str, Any]], Mapping[str, Any] | None] | None = None,
    log: Callable[[str], None] | None = print,
) -> EnsembleResult:
    """Train `len(seeds)` runs of `config` (one method) as one vmapped program.

    The stage schedule, optimizer (AdamW, warmup + cosine on the global step), model
    initialisation (`jax.random.key(seed)`) and growth (`config.preserve`,
    `config.opt_policy`) are the harness's (`stackops_harness.state`), so member `s` follows
    the same recipe as `train(config with seed=s)`; batches come from `train_batches`.

    **Arguments:**

    - `config`: the run's config (its `seed` is ignored; `seeds` gives them).
    - `seeds`: initialisation seeds, one per member.
    - `train_batches`: `step -> (S, B, seq_len + 1)` token rows (e.g. [`RandomWindows`][]).
    - `val_batches`: `(N, B, seq_len + 1)` rows shared by all members.
    - `on_eval`: `on_eval(step, params, static, record) -> dict | None` at every evaluation
      (after `config.eval_every` steps and at the end); its dict is merged into the record.
    - `log`: a printer for one line per evaluation (`None`: silent).

    **Returns:** an [`EnsembleResult`][].

    !!! Example

        ```python
        import numpy as np
        from stackops_harness.config import preset
        from stackops_harness.ensemble import RandomWindows, fixed_windows, train_ensemble

        cfg = preset("smoke", total_steps=8, warmup_steps=1, eval_every=4, stages=2, depth=2)
        toks = np.random.default_rng(0).integers(0, 256, 5000)
        res = train_ensemble(cfg, [0, 1], RandomWindows(toks, seq_len=cfg.seq_len, batch=2,
                             seeds=[0, 1]), fixed_windows(toks, seq_len=cfg.seq_len, batch=2,
                             num_batches=1), log=None)
        assert res.depth == 2 and len(res.history[-1]["val_loss"]) == 2
        ```
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty.")
    schedule = growth_schedule(config)
    optimizer, _ = make_optimizer(config)
    preserve = True if config.preserve else None
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    depth = schedule.initial_depth
    t_start = time.perf_counter()
    models = eqx.filter_vmap(lambda k: build_model(config, k, depth))(keys)
    params, static = eqx.partition(models, eqx.is_array)
    opt_state = jax.vmap(optimizer.init)(params)
    seconds = {"compile": 0.0, "train": 0.0, "grow": 0.0, "eval": 0.0,
               "init": time.perf_counter() - t_start}

    def make_step(static: Any) -> Any:
        def one(p: Any, o: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
            def loss_fn(q: Any) -> jax.Array:
                return next_token_loss(eqx.combine(q, static), tokens,
                                       compute_dtype=config.compute_dtype, unroll=config.unroll)

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, o = optimizer.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        return jax.jit(jax.vmap(one), donate_argnums=(0, 1))

    def make_eval(static: Any) -> Any:
        def one(p: Any, rows: jax.Array) -> jax.Array:
            model = eqx.combine(p, static)
            return jnp.mean(jax.vmap(lambda b: next_token_loss(
                model, b, compute_dtype=config.compute_dtype, unroll=config.unroll))(rows))

        return jax.jit(jax.vmap(one, in_axes=(0, None)))

    def make_grow(op: so.AbstractGrowth) -> Any:
        # filter_vmap returns the grown model's non-array part (the stack's routing, which
        # follows the depth) once, unbatched: it is the same for every member.
        def one(model: Any, o: Any) -> tuple[Any, Any]:
            grown = so.grow(model, op, where=blocks, preserve=preserve)
            new_o = so.grow_opt_state(optimizer, o, op, where=blocks,
                                      params=eqx.filter(model, eqx.is_array),
                                      policy=config.opt_policy)  # type: ignore[arg-type]
            return grown, new_o

        return eqx.filter_jit(eqx.filter_vmap(one))

    val = jnp.asarray(val_batches)
    history: list[dict[str, Any]] = []
    evals = _eval_steps(config)
    step, flops = 0, 0.0
    for stage, length in enumerate(schedule.lengths):
        fpt = flops_per_token(lm_config(config, depth), depth, config.seq_len)
        t0 = time.perf_counter()
        batch_shape = (len(seeds), *train_batches(0).shape[1:])
        key = _step_key(config, params, static, batch_shape)
        if key not in _STEPS:
            _STEPS[key] = (make_step(static).lower(
                params, opt_state, jax.ShapeDtypeStruct(batch_shape, jnp.int32)).compile(),
                make_eval(static))
        train_step, eval_step = _STEPS[key]
        seconds["compile"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(length):
            params, opt_state, loss = train_step(params, opt_state,
                                                 jnp.asarray(train_batches(step)))
            step += 1
            flops += fpt * config.global_batch * config.seq_len
            if step in evals:
                jax.block_until_ready(loss)
                seconds["train"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                rec: dict[str, Any] = {
                    "kind": "eval", "step": step, "stage": stage, "depth": depth,
                    "val_loss": np.asarray(eval_step(params, val)).tolist(),
                    "train_loss": np.asarray(loss).tolist(), "flops": flops,
                }
                if on_eval is not None:
                    rec |= dict(on_eval(step, params, static, rec) or {})
                seconds["eval"] += time.perf_counter() - t1
                rec |= {f"time_{k}": v for k, v in seconds.items()}
                history.append(rec)
                if log is not None:
                    log(f"step {step} depth {depth} val loss "
                        f"{np.mean(rec['val_loss']):.4f} (mean of {len(seeds)} seeds)")
                t0 = time.perf_counter()
        jax.block_until_ready(params)
        seconds["train"] += time.perf_counter() - t0
        if stage < len(schedule.ops):
            t0 = time.perf_counter()
            grown, opt_state = make_grow(schedule.ops[stage])(eqx.combine(params, static),
                                                              opt_state)
            params, static = eqx.partition(grown, eqx.is_array)
            jax.block_until_ready(params)
            depth = _depth_of(grown)
            seconds["grow"] += time.perf_counter() - t0
    return EnsembleResult(params, static, seeds, depth, history, seconds)


def _depth_of(model: Any) -> int:
    """Block positions of a seed-batched model's `Stack`: its routing, or axis 1 of its
    leaves (axis 0 is the seed)."""
    stack = blocks(model)
    if stack.order is not None:
        return len(stack.order)
    return int(jax.tree.leaves(stack.layers)[0].shape[1])
