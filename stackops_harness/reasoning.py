"""Reasoning-primitive evaluations of a model: k-shot in context and fine-tuning on 64 examples.

Both run on any checkpoint (a `DecoderLM`, or anything called as `model(tokens_BxT) ->
logits_BxTxV`). Also the layer-similarity matrix of a model's blocks (the paper's picture of
the looped structure that MIDAS induces).

Run alone on a checkpoint:

    python experiments/eval_primitives.py RUN_DIR [--step N]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import primitives as P

__all__ = [
    "PrimitiveEvalConfig",
    "PrimitiveSuite",
    "few_shot_accuracy",
    "finetune_accuracy",
    "layer_similarity",
]


@dataclasses.dataclass(frozen=True)
class PrimitiveEvalConfig:
    """How the primitives are evaluated.

    **Arguments:**

    - `tasks`: task names (see `stackops_harness.primitives.TASKS`).
    - `n_eval`: held-out examples per task (the same set for every model and method).
    - `shots`: in-context shots per prompt: `None` gives each task the most complete shots
      that fit in `max_len` (up to 5, the paper's number; see
      `stackops_harness.primitives.shots_that_fit`), an int gives every task that many
      (an error where they do not fit). Prompts are never cut.
    - `max_len`: the context length used at evaluation (the model's training length).
    - `batch_size`: rows per forward pass of the teacher-forced scoring (32 is faster per
      row than 128 on CPU).
    - `greedy_n`: prompts per task of the greedy-generation check.
    - `ft_examples`, `ft_steps`, `ft_lr`, `ft_batch`, `ft_runs`: fine-tuning on
      `ft_examples` pool examples for `ft_steps` AdamW steps, repeated `ft_runs` times on
      different pool draws (mean and sample standard deviation reported).
    - `eval_seed`: seed of the held-out set (keep it fixed across runs).
    """

    tasks: tuple[str, ...] = P.TASKS
    n_eval: int = 500
    shots: int | None = None
    max_len: int = 128
    batch_size: int = 32
    greedy_n: int = 100
    ft_examples: int = 64
    ft_steps: int = 60
    ft_lr: float = 1e-3
    ft_batch: int = 16
    ft_runs: int = 3
    eval_seed: int = 0

    def __post_init__(self):
        if isinstance(self.tasks, str) or not self.tasks:
            raise ValueError("PrimitiveEvalConfig.tasks must be a non-empty tuple of names.")
        for t in self.tasks:
            if t not in P.TASKS:
                raise ValueError(
                    f"PrimitiveEvalConfig.tasks: unknown task {t!r}; known: {P.TASKS}."
                )
        for name in ("n_eval", "max_len", "batch_size", "greedy_n", "ft_examples",
                     "ft_batch", "ft_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PrimitiveEvalConfig.{name} must be >= 1.")
        if (self.shots is not None and self.shots < 0) or self.ft_steps < 0:
            raise ValueError("PrimitiveEvalConfig: shots and ft_steps must be >= 0.")
        for t, k in self.task_shots().items():
            if P.shots_that_fit(t, self.max_len, cap=10**6) < k:
                raise ValueError(
                    f"PrimitiveEvalConfig: {k} shots of {t!r} do not fit in max_len="
                    f"{self.max_len}; use shots=None (as many as fit) or a longer context."
                )

    def task_shots(self) -> dict[str, int]:
        """The number of complete shots each task's prompts hold."""
        if self.shots is None:
            return {t: P.shots_that_fit(t, self.max_len) for t in self.tasks}
        return {t: self.shots for t in self.tasks}


@eqx.filter_jit
def _logits(model: Any, tokens: jax.Array, attention: Any = None) -> jax.Array:
    if attention is None:
        return model(tokens)
    return model(tokens, unroll=True, attention=attention)


def _generate_fn(model: Any, max_len: int, batch_size: int = 64, attention: Any = None):
    def fn(prompts: list[str], max_new_tokens: int) -> list[str]:
        return P.greedy_generate(
            lambda t: _logits(model, jnp.asarray(t), attention),
            prompts,
            max_new_tokens,
            max_len=max_len,
            batch_size=min(batch_size, len(prompts)),
        )

    return fn


class PrimitiveSuite:
    """The evaluation sets of [`PrimitiveEvalConfig`][], built once, scored many times.

    For each task: the held-out examples, their k-shot prompts (complete shots from a
    disjoint pool), the teacher-forcing rows and the floors
    (`stackops_harness.primitives.floors`). [`PrimitiveSuite.accuracy`][] scores any model
    by teacher-forced exact match, one forward pass per batch of fixed shape (so one
    compilation serves every task, evaluation and seed).

    **Arguments:**

    - `cfg`: the evaluation settings.
    - `attention`: the attention core models are called with (`None`: the model's
      default); pass the training run's (`stackops_harness.state.run_attention`) so that
      evaluation is as fast as training.

    !!! Example

        ```python
        import jax
        from stackops.models import DecoderLM, LMConfig
        from stackops_harness.reasoning import PrimitiveEvalConfig, PrimitiveSuite

        suite = PrimitiveSuite(PrimitiveEvalConfig(tasks=("math",), n_eval=8, max_len=64))
        model = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=1, max_len=64),
                          key=jax.random.key(0))
        assert 0.0 <= suite.accuracy(model)["math"] <= 1.0
        assert suite.shots["math"] == 5 and suite.floors["math"]["floor"] >= 0.1
        ```
    """

    def __init__(self, cfg: PrimitiveEvalConfig, *, attention: Any = None):
        self.cfg = cfg
        self.attention = attention
        self.shots = cfg.task_shots()
        self.examples: dict[str, list[P.Example]] = {}
        self.prompts: dict[str, list[str]] = {}
        self.floors: dict[str, dict[str, float | None]] = {}
        self._pools: dict[str, list[P.Example]] = {}
        for task in cfg.tasks:
            splits = P.make_splits(
                task, n_eval=cfg.n_eval, n_pool=max(64, 4 * self.shots[task]),
                eval_seed=cfg.eval_seed,
            )
            self.examples[task] = splits.eval
            self._pools[task] = splits.pool
            self.prompts[task] = P.k_shot_prompts(splits.eval, splits.pool,
                                                  k=self.shots[task], seed=cfg.eval_seed)
            self.floors[task] = P.floors(task, splits.eval)
        # Rows are grouped by length into buckets of 32, 64, ... up to max_len tokens, so
        # short tasks (recall, math) do not pay for the longest context: a few compiled
        # shapes, each batch one forward pass.
        self._buckets: dict[int, list[str]] = {}
        for task in cfg.tasks:
            longest = max(len(p.encode()) + len(e.answer.encode())
                          for p, e in zip(self.prompts[task], self.examples[task]))
            width = min(cfg.max_len, 32 * -(-longest // 32))
            P.teacher_forced_batch(self.prompts[task], [e.answer for e in self.examples[task]],
                                   max_len=width)  # checks that every row fits
            self._buckets.setdefault(width, []).append(task)

    def hits(self, logits_fn: Any) -> dict[str, np.ndarray]:
        """Per task, exact match per example (bool `(..., n_eval)`), by teacher forcing.

        `logits_fn` is a model (called as `model(tokens)`) or any `tokens -> logits`
        function; leading axes of its output (e.g. seeds) are kept.
        """
        fn = logits_fn
        if isinstance(logits_fn, eqx.Module):
            fn = lambda t: _logits(logits_fn, t, self.attention)  # noqa: E731
        out: dict[str, np.ndarray] = {}
        for width, tasks in self._buckets.items():
            prompts = [p for t in tasks for p in self.prompts[t]]
            answers = [e.answer for t in tasks for e in self.examples[t]]
            flat = P.teacher_forced_exact_match(
                fn, prompts, answers, max_len=width,
                batch_size=min(self.cfg.batch_size, len(prompts)),
            )
            start = 0
            for t in tasks:
                n = len(self.examples[t])
                out[t] = flat[..., start : start + n]
                start += n
        return {t: out[t] for t in self.cfg.tasks}

    def accuracy(self, logits_fn: Any) -> dict[str, Any]:
        """Per task, the teacher-forced exact-match accuracy (an array over leading axes)."""
        return {t: (h.mean(axis=-1) if h.ndim > 1 else float(h.mean()))
                for t, h in self.hits(logits_fn).items()}

    def math_kinds(self, hits: np.ndarray) -> dict[int, float]:
        """Accuracy on the math set by number of operations (for reweighting to the
        training shares); `hits` is this suite's math row of [`PrimitiveSuite.hits`][]."""
        ops = np.array([sum(c in "+-" for c in e.prompt) for e in self.examples["math"]])
        return {int(k): float(np.mean(hits[ops == k])) for k in np.unique(ops)}

    def greedy(self, model: Any, *, n: int | None = None) -> dict[str, float]:
        """The generation check: greedy decoding of the first `n` prompts (default
        `cfg.greedy_n`) per task, scored with `stackops_harness.primitives.is_exact_match`."""
        n = n or self.cfg.greedy_n
        gen = _generate_fn(model, self.cfg.max_len, attention=self.attention)
        out = {}
        for task in self.cfg.tasks:
            exs = self.examples[task][:n]
            out[task] = P.evaluate_exact_match(gen, exs, self._pools[task],
                                               k=self.shots[task], seed=self.cfg.eval_seed)
        return out


def few_shot_accuracy(
    model: Any, cfg: PrimitiveEvalConfig, *, greedy: bool = False
) -> dict[str, float]:
    """k-shot exact-match accuracy on each task's held-out set.

    Teacher-forced by default (every answer token is the argmax given the prompt and the
    answer's earlier tokens), greedy decoding with `greedy=True` (the check). Builds a
    [`PrimitiveSuite`][]; keep one to score many checkpoints.

    !!! Example

        ```python
        import jax
        from stackops_harness.reasoning import PrimitiveEvalConfig, few_shot_accuracy
        from stackops.models import DecoderLM, LMConfig

        model = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=1, max_len=64),
                          key=jax.random.key(0))
        acc = few_shot_accuracy(model, PrimitiveEvalConfig(tasks=("math",), n_eval=8, max_len=64))
        assert 0.0 <= acc["math"] <= 1.0
        ```
    """
    suite = PrimitiveSuite(cfg)
    return suite.greedy(model, n=cfg.n_eval) if greedy else suite.accuracy(model)


def _masked_xent(model: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def finetune_accuracy(
    model: Any, cfg: PrimitiveEvalConfig, *, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """Fine-tune a copy of `model` on `ft_examples` examples per task, then score 0-shot.

    Each task is fine-tuned separately, `ft_runs` times with different pool draws and batch
    orders; the loss covers only the answer tokens; scored by teacher-forced exact match,
    0-shot. Returns, per task, the mean, the sample standard deviation (ddof=1; 0 for one
    run) and the per-run accuracies. The input model is not changed.

    !!! Example

        ```python
        import jax
        from stackops_harness.reasoning import PrimitiveEvalConfig, finetune_accuracy
        from stackops.models import DecoderLM, LMConfig

        model = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=1, max_len=64),
                          key=jax.random.key(0))
        cfg = PrimitiveEvalConfig(tasks=("math",), n_eval=8, max_len=64, ft_steps=2, ft_runs=2)
        res = finetune_accuracy(model, cfg)
        assert len(res["math"]["runs"]) == 2
        ```
    """
    optimizer = optax.adamw(cfg.ft_lr, weight_decay=0.0)

    @eqx.filter_jit
    def step(m, state, tokens, mask):
        loss, grads = eqx.filter_value_and_grad(_masked_xent)(m, tokens, mask)
        params = eqx.filter(m, eqx.is_inexact_array)
        updates, state = optimizer.update(eqx.filter(grads, eqx.is_inexact_array), state, params)
        return eqx.apply_updates(m, updates), state, loss

    out: dict[str, dict[str, float | list[float]]] = {}
    for task in cfg.tasks:
        accs = []
        for run in range(cfg.ft_runs):
            splits = P.make_splits(
                task,
                n_eval=cfg.n_eval,
                n_pool=cfg.ft_examples,
                eval_seed=cfg.eval_seed,
                pool_seed=1000 * (seed + 1) + run,
            )
            tokens, mask = P.finetune_examples_to_batch(splits.pool, cfg.max_len)
            rng = np.random.default_rng([seed, run])
            m = model
            state = optimizer.init(eqx.filter(m, eqx.is_inexact_array))
            for _ in range(cfg.ft_steps):
                idx = rng.choice(len(tokens), size=min(cfg.ft_batch, len(tokens)), replace=False)
                m, state, _ = step(m, state, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
            trained = m

            def logits_fn(t: Any, trained: Any = trained) -> Any:
                return _logits(trained, t)

            hits = P.teacher_forced_exact_match(
                logits_fn, [e.prompt for e in splits.eval],
                [e.answer for e in splits.eval], max_len=cfg.max_len,
                batch_size=min(cfg.batch_size, len(splits.eval)))
            accs.append(float(np.mean(hits)))
        sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        out[task] = {"mean": float(np.mean(accs)), "std": sd, "runs": accs}
    return out


def layer_similarity(blocks: Any) -> np.ndarray:
    """Cosine similarity of every pair of layers' flattened weights (matrices only).

    `blocks` is a `stackops.Stack` (positions are compared, so tied positions score 1) or a
    list of layers. Norm scales are left out: they start equal in every layer and would
    blur the picture.

    !!! Example

        ```python
        import jax
        import stackops as so
        from stackops_harness.reasoning import layer_similarity
        from stackops.models import DecoderLM, LMConfig

        m = DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=2), key=jax.random.key(0))
        g = so.grow(m, so.middle_stack(block=1), where=lambda t: t.blocks)
        sim = layer_similarity(g.blocks)
        assert sim.shape == (3, 3) and abs(sim[0, 1] - 1.0) < 1e-6
        ```
    """
    import stackops as so

    if isinstance(blocks, so.Stack):
        n = len(blocks)
        idx = blocks.order if blocks.order is not None else range(n)
        mats = [x for x in jax.tree.leaves(blocks.layers) if x.ndim >= 3]
        flat = np.concatenate(
            [np.asarray(x).reshape(x.shape[0], -1)[list(idx)] for x in mats], axis=1
        )
    else:
        rows = []
        for layer in blocks:
            mats = [x for x in jax.tree.leaves(layer) if x.ndim >= 2]
            rows.append(np.concatenate([np.asarray(x).ravel() for x in mats]))
        flat = np.stack(rows)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    return flat @ flat.T


def summarize(
    few: dict[str, float], ft: dict[str, dict[str, Any]], tasks: Sequence[str]
) -> dict[str, Any]:
    """Flatten the two evaluations into one JSON-friendly record."""
    rec: dict[str, Any] = {}
    for t in tasks:
        if t in few:
            rec[f"fewshot/{t}"] = few[t]
        if t in ft:
            rec[f"ft/{t}/mean"] = ft[t]["mean"]
            rec[f"ft/{t}/std"] = ft[t]["std"]
    if few:
        rec["fewshot/avg"] = float(np.mean([few[t] for t in tasks if t in few]))
    if ft:
        rec["ft/avg"] = float(np.mean([ft[t]["mean"] for t in tasks if t in ft]))
    return rec


def informed_guess_accuracy(task: str, n_eval: int = 500, eval_seed: int = 0) -> float:
    """Expected accuracy of a model that knows the format but not the computation.

    `stackops_harness.primitives.floors(...)["informed"]` on the task's held-out set.

    !!! Example

        ```python
        from stackops_harness.reasoning import informed_guess_accuracy

        assert 0.1 < informed_guess_accuracy("varassign_d2", n_eval=50) < 0.5
        ```
    """
    examples = P.generate(task, n_eval, seed=eval_seed, stream="eval")
    value = P.floors(task, examples)["informed"]
    assert value is not None
    return value
