"""The pretraining corpus of the MIDAS experiments: real text plus a share of synthetic primitives.

Real text is the Python standard library's sources (every machine has them offline; its
assignments and arithmetic resemble the primitives). A tiny model trained briefly on code
alone stays at chance on the primitives, and then no comparison between methods means
anything, so a fraction of the training tokens (`synthetic_fraction`; `midas.py` uses 50%) are
documents of primitive examples in the few-shot line format `"{prompt}{answer}\\n"`, drawn
from the `"pool"` streams with seeds that never produce an evaluation prompt. The
validation split is real text only, so validation loss measures language modelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import data as D
from . import primitives as P

__all__ = ["build_mixed_corpus", "EVAL_EXCLUDE"]

EVAL_EXCLUDE = 500
"""Evaluation prompts (per task, eval seed 0) that never appear in the pretraining text."""


def _synthetic_docs(n_tokens: int, *, seed: int, examples_per_doc: int = 8) -> list[str]:
    """Documents of same-task primitive examples, about `n_tokens` bytes in all."""
    exclude = {
        task: {
            e.prompt
            for e in P.generate(
                task, EVAL_EXCLUDE if task != "math" else 300, seed=0, stream="eval"
            )
        }
        for task in P.TASKS
    }
    docs: list[str] = []
    total = 0
    round_ = 0
    rng = np.random.default_rng(seed)
    while total < n_tokens:
        for t_idx, task in enumerate(P.TASKS):
            n = 64
            exs = P.generate(
                task,
                n,
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
        round_ += 1
    return docs


def build_mixed_corpus(
    out_dir: str | Path,
    *,
    synthetic_fraction: float = 0.2,
    max_mb: float = 20.0,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `train.bin`, `val.bin` and `meta.json` mixing stdlib text and primitives.

    Reuses the files if `meta.json` already records the same settings.

    **Arguments:**

    - `out_dir`: where to write.
    - `synthetic_fraction`: share of the training tokens that are primitive examples (0..0.9).
    - `max_mb`: cap on the stdlib text read, in MB.
    - `val_fraction`: share of the real text held out for validation.
    - `seed`: shuffling and generation seed.

    **Returns:** the metadata dict (also saved as `meta.json`).

    !!! Example

        ```python
        import tempfile
        from harness.corpus import build_mixed_corpus

        meta = build_mixed_corpus(tempfile.mkdtemp(), max_mb=0.2, synthetic_fraction=0.2)
        assert 0.15 < meta["synthetic_fraction_actual"] < 0.3
        ```
    """
    if not 0.0 <= synthetic_fraction < 0.9:
        raise ValueError(f"`synthetic_fraction` must be in [0, 0.9), got {synthetic_fraction}.")
    out = Path(out_dir)
    settings = {
        "synthetic_fraction": synthetic_fraction,
        "max_mb": max_mb,
        "val_fraction": val_fraction,
        "seed": seed,
        "format": 1,
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
    syn_docs = _synthetic_docs(n_syn, seed=seed) if n_syn > 0 else []
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
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
