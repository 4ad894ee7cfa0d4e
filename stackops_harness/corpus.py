"""The pretraining corpus of the MIDAS experiments: real text plus a share of synthetic primitives.

Real text is the Python standard library's sources (every machine has them offline; its
assignments and arithmetic resemble the primitives). A tiny model trained briefly on code
alone stays at chance on the primitives, and then no comparison between methods means
anything, so a fraction of the training tokens (`synthetic_fraction`; `MIX` has 60%) are
documents of primitive examples in the few-shot line format `"{prompt}{answer}\\n"`, drawn
from the `"pool"` streams with seeds that never produce an evaluation prompt, in the shares
of `task_weights`; optionally some are copy documents (`copy_share`). The
validation split is real text only, so validation loss measures language modelling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import data as D
from . import primitives as P

__all__ = ["build_mixed_corpus", "corpus_dir", "EVAL_EXCLUDE", "DEFAULT_TASK_WEIGHTS", "MIX"]

EVAL_EXCLUDE = 500
"""Evaluation prompts (per task, eval seed 0) that never appear in the pretraining text."""


DEFAULT_TASK_WEIGHTS = {task: 1.0 / len(P.TASKS) for task in P.TASKS}
"""Equal token shares for every primitive task."""


MIX = dict(synthetic_fraction=0.6, task_weights=dict(
    math=0.6, induction=0.1, varassign_d0=0.1, varassign_d1=0.1, varassign_d2=0.1))
"""The pretraining mix of `midas.py` and `looped.py`: 60% of the tokens synthetic, mostly math.

Measured on 2 CPU cores: this model size learns the math primitive from a few hundred
steps' worth of math examples, while the look-up tasks (induction, variable assignment)
stay at their informed-guess floor even on 1000 steps of pure task data (their "induction
head" mechanism needs far more steps than a CPU budget has). Math therefore gets most of
the synthetic share, so that the baseline is well above chance on it and the methods can
be compared; the other tasks stay in the mix and in the evaluation.
"""

def corpus_dir(root: str | Path, settings: dict[str, Any]) -> Path:
    """The folder under `root` for a corpus built with `settings` (a hash of them).

    !!! Example

        >>> corpus_dir("data", dict(MIX, max_mb=20.0)).parent.name
        'data'
    """
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / f"mixed-{digest}"


def _check_task_weights(task_weights: dict[str, float]) -> dict[str, float]:
    unknown = set(task_weights) - set(P.TASKS)
    if unknown:
        raise ValueError(
            f"`task_weights` has unknown tasks {sorted(unknown)}; known: {P.TASKS}."
        )
    if any(not w >= 0 for w in task_weights.values()) or sum(task_weights.values()) <= 0:
        raise ValueError(f"`task_weights` must be >= 0 and not all zero, got {task_weights}.")
    total = float(sum(task_weights.values()))
    return {t: float(task_weights.get(t, 0.0)) / total for t in P.TASKS}


def _synthetic_docs(
    n_tokens: int,
    *,
    seed: int,
    task_weights: dict[str, float],
    examples_per_doc: int = 8,
) -> tuple[list[str], dict[str, int]]:
    """Documents of same-task primitive examples, about `n_tokens` bytes in all, each task
    taking about its `task_weights` share of the bytes; also the bytes of each task."""
    exclude = {
        task: {
            e.prompt
            for e in P.generate(
                task, EVAL_EXCLUDE if task != "math" else 300, seed=0, stream="eval"
            )
        }
        for task in P.TASKS
    }
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    counts: dict[str, int] = {}
    for t_idx, task in enumerate(P.TASKS):
        budget = n_tokens * task_weights[task]
        total, round_ = 0, 0
        while total < budget:
            exs = P.generate(
                task,
                64,
                seed=10_000 + 97 * seed + 7 * round_ + t_idx,
                stream="pool",
                exclude=exclude[task],
            )
            order = rng.permutation(len(exs))
            for start in range(0, len(exs) - examples_per_doc + 1, examples_per_doc):
                chunk = [exs[i] for i in order[start : start + examples_per_doc]]
                doc = "".join(f"{e.prompt}{e.answer}\n" for e in chunk)
                docs.append(doc)
                total += len(doc)
                if total >= budget:
                    break
            round_ += 1
        counts[task] = total
    return docs, counts


def _copy_docs(n_tokens: int, *, seed: int) -> list[str]:
    """Documents of random two-letter items, then `|` and the same items again.

    Copying a span seen earlier is the mechanism behind the induction and variable-lookup
    primitives ("induction heads"). Real text rewards it too, but too rarely for a model
    trained for minutes; a dense dose teaches it in a few hundred steps.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, 7)))
    docs: list[str] = []
    total = 0
    items = P.INDUCTION_ITEMS
    while total < n_tokens:
        n = int(rng.integers(6, 17))
        seq = " ".join(items[i] for i in rng.integers(len(items), size=n))
        doc = f"{seq} | {seq}\n"
        docs.append(doc)
        total += len(doc)
    return docs


def build_mixed_corpus(
    out_dir: str | Path,
    *,
    synthetic_fraction: float = 0.2,
    copy_share: float = 0.0,
    task_weights: dict[str, float] | None = None,
    max_mb: float = 20.0,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `train.bin`, `val.bin` and `meta.json` mixing stdlib text and primitives.

    Reuses the files if `meta.json` already records the same settings.

    **Arguments:**

    - `out_dir`: where to write.
    - `synthetic_fraction`: share of the training tokens that are synthetic (0..0.9).
    - `copy_share`: share of the synthetic tokens that are copy documents (random items,
      `|`, the same items again) rather than primitive examples (0..1).
    - `task_weights`: relative share of the primitive bytes per task (missing tasks get 0;
      default: equal shares).
    - `max_mb`: cap on the stdlib text read, in MB.
    - `val_fraction`: share of the real text held out for validation.
    - `seed`: shuffling and generation seed.

    **Returns:** the metadata dict (also saved as `meta.json`).

    !!! Example

        ```python
        import tempfile
        from stackops_harness.corpus import build_mixed_corpus

        meta = build_mixed_corpus(tempfile.mkdtemp(), max_mb=0.2, synthetic_fraction=0.2)
        assert 0.15 < meta["synthetic_fraction_actual"] < 0.3
        ```
    """
    if not 0.0 <= synthetic_fraction < 0.9:
        raise ValueError(f"`synthetic_fraction` must be in [0, 0.9), got {synthetic_fraction}.")
    if not 0.0 <= copy_share <= 1.0:
        raise ValueError(f"`copy_share` must be in [0, 1], got {copy_share}.")
    weights = _check_task_weights(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    out = Path(out_dir)
    settings = {
        "synthetic_fraction": synthetic_fraction,
        "max_mb": max_mb,
        "val_fraction": val_fraction,
        "seed": seed,
        "copy_share": copy_share,
        "task_weights": weights,
        "format": 2,
    }
    meta_path = out / "meta.json"
    if meta_path.exists() and (out / "train.bin").exists() and (out / "val.bin").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return meta
    out.mkdir(parents=True, exist_ok=True)
    files = D.default_corpus_files(max_bytes=int(max_mb * 1e6))
    if not files:
        raise RuntimeError("No standard-library source files found to build the corpus from.")
    rng = np.random.default_rng(seed)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    order = rng.permutation(len(texts))
    total = sum(len(t) for t in texts)
    val_docs, train_docs, acc = [], [], 0
    for i in order:
        if acc < val_fraction * total:
            val_docs.append(texts[i])
            acc += len(texts[i])
        else:
            train_docs.append(texts[i])
    real_train = sum(len(t) for t in train_docs)
    n_syn = int(real_train * synthetic_fraction / (1.0 - synthetic_fraction))
    n_copy = int(n_syn * copy_share)
    n_prim = n_syn - n_copy
    syn_docs, task_tokens = (
        _synthetic_docs(n_prim, seed=seed, task_weights=weights) if n_prim > 0 else ([], {})
    )
    copy_docs = _copy_docs(n_copy, seed=seed) if n_copy > 0 else []
    syn_docs += copy_docs
    # Interleave synthetic documents uniformly among the real ones.
    all_docs = train_docs + syn_docs
    perm = rng.permutation(len(all_docs))
    sep = D.DEFAULT_SEPARATOR
    train_ids = D.encode(sep.join(all_docs[i] for i in perm))
    val_ids = D.encode(sep.join(val_docs))
    D.write_tokens(out / "train.bin", train_ids)
    D.write_tokens(out / "val.bin", val_ids)
    syn_tokens = sum(len(d.encode("utf-8")) for d in syn_docs)
    meta = {
        "settings": settings,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "stdlib_files": len(texts),
        "synthetic_docs": len(syn_docs),
        "synthetic_tokens": int(syn_tokens),
        "synthetic_fraction_actual": syn_tokens / max(1, int(train_ids.size)),
        "copy_tokens": int(sum(len(d) for d in copy_docs)),
        "task_tokens": task_tokens,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
