"""The pretraining corpus of the MIDAS experiments: real text plus a share of synthetic primitives.

Real text is the Python standard library's sources (every machine has them offline; its
assignments and arithmetic resemble the primitives). A tiny model trained briefly on code
alone stays at chance on the primitives, and then no comparison between methods means
anything, so a fraction of the training tokens (`synthetic_fraction`; `MIX` has 60%) are
documents of primitive examples in the few-shot line format `"{prompt}{answer}\\n"`, drawn
from the `"pool"` streams with seeds that never produce an evaluation prompt, in the shares
of `task_weights`; optionally some are copy documents (`copy_share`). The `"recall"` task's
documents are the closed-book facts (`stackops_harness.primitives.recall_table`), the same
facts the evaluation asks without context. The validation split is real text only, so
validation loss measures language modelling.

Building needs only NumPy ([`mixed_corpus_tokens`][] returns the token arrays, for a
machine without grain); [`build_mixed_corpus`][] also writes the token files.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from . import presets as _presets
from . import primitives as P
from .tokenizer import encode

__all__ = ["build_mixed_corpus", "mixed_corpus_tokens", "corpus_dir", "stdlib_sources",
           "EVAL_EXCLUDE", "DEFAULT_TASK_WEIGHTS", "MIX"]

EVAL_EXCLUDE = {"math": 500, "recall": 0}
"""Evaluation prompts per task (eval seed 0) that never appear in the pretraining text:
1000 for the tasks not named here; 500 for math (a smaller prompt space, so that holding
prompts out shifts its training distribution little); none for the closed-book facts."""

SEPARATOR = "\n\n"
"""Between documents (as `stackops_harness.data.DEFAULT_SEPARATOR`)."""

_EXCLUDED_STDLIB_PARTS = frozenset({"test", "tests", "idlelib", "site-packages"})


DEFAULT_TASK_WEIGHTS = {task: 1.0 / len(P.TASKS) for task in P.TASKS}
"""Equal token shares for every primitive task."""


# The pretraining mix of midas.py and looped.py is kept with the presets.
MIX = _presets.MIX


def stdlib_sources(max_bytes: int = 20_000_000) -> list[Path]:
    """The Python standard library's `.py` files (tests, idlelib, site-packages left out),
    sorted by relative path, the prefix that fits in `max_bytes`.

    `stackops_harness.data.default_corpus_files` returns this list (this module needs no grain).

    !!! Example

        >>> files = stdlib_sources(max_bytes=100_000)
        >>> sum(f.stat().st_size for f in files) <= 100_000 and len(files) > 0
        True
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"`max_bytes` must be a positive int, got {max_bytes!r}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(
        (f.relative_to(root).as_posix(), f) for f in root.rglob("*.py")
        if not _EXCLUDED_STDLIB_PARTS.intersection(f.relative_to(root).parts[:-1])
        and f.is_file()
    )
    files, total = [], 0
    for _, f in candidates:
        size = f.stat().st_size
        if total + size > max_bytes:
            break
        files.append(f)
        total += size
    return files

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
        task: {e.prompt for e in P.generate(task, EVAL_EXCLUDE.get(task, 1000), seed=0,
                                            stream="eval")}
        for task in P.TASKS
    }
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    counts: dict[str, int] = {}
    math_examples: list[P.Example] = []
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
            if task == "math":
                math_examples += exs
            for start in range(0, len(exs) - examples_per_doc + 1, examples_per_doc):
                chunk = [exs[i] for i in order[start : start + examples_per_doc]]
                doc = "".join(f"{e.prompt}{e.answer}\n" for e in chunk)
                docs.append(doc)
                total += len(doc)
                if total >= budget:
                    break
            round_ += 1
        counts[task] = total
    if math_examples:
        counts["math_kind_shares"] = P.math_kind_shares(math_examples)  # type: ignore[assignment]
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


def _settings(synthetic_fraction: float, copy_share: float,
              task_weights: dict[str, float] | None, max_mb: float, val_fraction: float,
              seed: int) -> dict[str, Any]:
    if not 0.0 <= synthetic_fraction < 0.9:
        raise ValueError(f"`synthetic_fraction` must be in [0, 0.9), got {synthetic_fraction}.")
    if not 0.0 <= copy_share <= 1.0:
        raise ValueError(f"`copy_share` must be in [0, 1], got {copy_share}.")
    weights = _check_task_weights(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    return {"synthetic_fraction": synthetic_fraction, "max_mb": max_mb,
            "val_fraction": val_fraction, "seed": seed, "copy_share": copy_share,
            "task_weights": weights, "format": 3}


def mixed_corpus_tokens(
    *,
    synthetic_fraction: float = 0.2,
    copy_share: float = 0.0,
    task_weights: dict[str, float] | None = None,
    max_mb: float = 20.0,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The mixed corpus as token arrays, built with NumPy only (no files, no grain).

    Arguments as [`build_mixed_corpus`][].

    **Returns:** `(train_ids, val_ids, meta)`: `uint16` token arrays and the metadata.

    !!! Example

        ```python
        from stackops_harness.corpus import mixed_corpus_tokens

        train, val, meta = mixed_corpus_tokens(max_mb=0.2, synthetic_fraction=0.2)
        assert train.dtype.name == "uint16" and meta["val_tokens"] == val.size
        ```
    """
    settings = _settings(synthetic_fraction, copy_share, task_weights, max_mb, val_fraction,
                         seed)
    files = stdlib_sources(max_bytes=int(max_mb * 1e6))
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
    weights = settings["task_weights"]
    syn_docs, task_tokens = (
        _synthetic_docs(n_prim, seed=seed, task_weights=weights) if n_prim > 0 else ([], {})
    )
    math_shares: Any = task_tokens.pop("math_kind_shares", None)  # a dict among the counts
    copy_docs = _copy_docs(n_copy, seed=seed) if n_copy > 0 else []
    syn_docs += copy_docs
    # Interleave synthetic documents uniformly among the real ones.
    all_docs = train_docs + syn_docs
    perm = rng.permutation(len(all_docs))
    train_ids = encode(SEPARATOR.join(all_docs[i] for i in perm))
    val_ids = encode(SEPARATOR.join(val_docs))
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
        # JSON keys are strings: the same dict whether built now or read from meta.json.
        "math_kind_shares": None if math_shares is None else {
            str(k): v for k, v in math_shares.items()},
    }
    return train_ids, val_ids, meta


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
    from . import data as D  # token files with checksums (the experiments extra)

    settings = _settings(synthetic_fraction, copy_share, task_weights, max_mb, val_fraction,
                         seed)
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.exists() and (out / "train.bin").exists() and (out / "val.bin").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return meta
    train_ids, val_ids, meta = mixed_corpus_tokens(
        synthetic_fraction=synthetic_fraction, copy_share=copy_share,
        task_weights=task_weights, max_mb=max_mb, val_fraction=val_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    D.write_tokens(out / "train.bin", train_ids)
    D.write_tokens(out / "val.bin", val_ids)
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
