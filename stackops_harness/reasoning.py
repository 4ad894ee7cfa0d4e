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
    - `shots`: in-context examples per prompt (5 in the paper); prompts longer than the
      context are cut from the left, so long tasks may see fewer whole shots.
    - `max_len`: the context length used at evaluation (the model's training length).
    - `ft_examples`, `ft_steps`, `ft_lr`, `ft_batch`, `ft_runs`: fine-tuning on
      `ft_examples` pool examples for `ft_steps` AdamW steps, repeated `ft_runs` times on
      different pool draws (mean and standard deviation reported).
    - `eval_seed`: seed of the held-out set (keep it fixed across runs).
    """

    tasks: tuple[str, ...] = P.TASKS
    n_eval: int = 200
    shots: int = 5
    max_len: int = 128
    ft_examples: int = 64
    ft_steps: int = 60
    ft_lr: float = 1e-3
    ft_batch: int = 16
    ft_runs: int = 3
    eval_seed: int = 0

    def __post_init__(self):
        for t in self.tasks:
            if t not in P.TASKS:
                raise ValueError(
                    f"PrimitiveEvalConfig.tasks: unknown task {t!r}; known: {P.TASKS}."
                )
        for name in ("n_eval", "max_len", "ft_examples", "ft_batch", "ft_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PrimitiveEvalConfig.{name} must be >= 1.")
        if self.shots < 0 or self.ft_steps < 0:
            raise ValueError("PrimitiveEvalConfig: shots and ft_steps must be >= 0.")


@eqx.filter_jit
def _logits(model: Any, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _generate_fn(model: Any, max_len: int, batch_size: int = 64):
    def fn(prompts: list[str], max_new_tokens: int) -> list[str]:
        return P.greedy_generate(
            lambda t: _logits(model, jnp.asarray(t)),
            prompts,
            max_new_tokens,
            max_len=max_len,
            batch_size=min(batch_size, len(prompts)) if len(prompts) < batch_size else batch_size,
        )

    return fn


def few_shot_accuracy(model: Any, cfg: PrimitiveEvalConfig, *, seed: int = 0) -> dict[str, float]:
    """k-shot exact-match accuracy on each task's held-out set.

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
    out = {}
    gen = _generate_fn(model, cfg.max_len)
    for task in cfg.tasks:
        splits = P.make_splits(
            task, n_eval=cfg.n_eval, n_pool=max(64, cfg.shots * 4), eval_seed=cfg.eval_seed
        )
        out[task] = P.evaluate_exact_match(gen, splits.eval, splits.pool, k=cfg.shots, seed=seed)
    return out


def _masked_xent(model: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def finetune_accuracy(
    model: Any, cfg: PrimitiveEvalConfig, *, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """Fine-tune a copy of `model` on `ft_examples` examples per task, then score 0-shot.

    Each task is fine-tuned separately, `ft_runs` times with different pool draws and batch
    orders; the loss covers only the answer tokens. Returns, per task, the mean, the standard
    deviation (ddof=0) and the per-run accuracies. The input model is not changed.

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
            gen = _generate_fn(m, cfg.max_len)
            accs.append(P.evaluate_exact_match(gen, splits.eval, splits.pool, k=0, seed=seed))
        out[task] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
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


def informed_guess_accuracy(task: str, n_eval: int = 200, eval_seed: int = 0) -> float:
    """Expected accuracy of a model that knows the format but not the computation.

    A stronger floor than uniform chance: for `varassign_*` and `induction`, guessing
    uniformly among the distinct candidate answers that appear in the prompt (its digits,
    its items); for `math`, always answering the most frequent result. A model must beat
    this, not just uniform chance, before it can be said to compute anything.

    !!! Example

        ```python
        from stackops_harness.reasoning import informed_guess_accuracy

        assert 0.1 < informed_guess_accuracy("varassign_d2", n_eval=50) < 0.5
        ```
    """
    import re
    from collections import Counter

    examples = P.generate(task, n_eval, seed=eval_seed, stream="eval")
    if task == "math":
        counts = Counter(e.answer for e in examples)
        return counts.most_common(1)[0][1] / len(examples)
    accs = []
    for e in examples:
        if task == "induction":
            context = e.prompt.split("|")[0].split()
            cands = set(context)
        else:
            cands = set(re.findall(r"\d", e.prompt))
        accs.append(1.0 / len(cands) if e.answer in cands else 0.0)
    return float(np.mean(accs))
