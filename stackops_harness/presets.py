"""Every preset of the harness, in one place: training (`stackops-train`), the MIDAS
comparison (`stackops-midas`) and the looped model (`stackops-looped`).

Presets are plain dicts of flat `TrainConfig` field values (and, for the experiments, the
primitive evaluation and corpus settings), so this module imports nothing but the standard
library: the command lines list the preset names before JAX starts. The configs are
validated where they are made (`stackops_harness.config.preset`, the experiments' plans;
the harness tests build every preset).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TRAIN_PRESETS", "MIDAS_PRESETS", "LOOPED_PRESETS", "EVAL_TASKS", "MIX"]

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: a 4-stage run of a tiny model, for tests and a first look.
    "smoke": dict(
        d_model=32,
        n_heads=2,
        depth=4,
        stages=4,
        seq_len=32,
        global_batch=8,
        total_steps=40,
        warmup_steps=4,
        lr=3e-3,
        eval_every=10,
        eval_batches=2,
        ckpt_every=10,
        log_every=1,
        keep_checkpoints=2,
    ),
    # Minutes to tens of minutes on two CPU cores (~1.6M parameters, 8 blocks).
    "cpu": dict(
        d_model=128,
        n_heads=4,
        depth=8,
        stages=4,
        seq_len=128,
        global_batch=16,
        total_steps=1500,
        warmup_steps=75,
        lr=3e-3,
        eval_every=100,
        eval_batches=4,
        ckpt_every=250,
        log_every=10,
    ),
    # An accelerator run: 114M parameters (16 blocks of width 768), bf16 matmuls, 32K
    # tokens per step (~1B tokens in all).
    "gpu": dict(
        d_model=768,
        n_heads=12,
        depth=16,
        stages=4,
        seq_len=512,
        global_batch=64,
        total_steps=30000,
        warmup_steps=1000,
        lr=6e-4,
        weight_decay=0.1,
        compute_dtype="bfloat16",
        unroll=1,
        eval_every=500,
        eval_batches=16,
        eval_batch=64,
        ckpt_every=1000,
        log_every=50,
    ),
}
"""The presets of `stackops-train` and `stackops_harness.config.preset`."""

EVAL_TASKS = ("varassign_d0", "varassign_d1", "varassign_d2", "math", "recall")
"""The tasks scored by default: those of the pretraining mix (`MIX`); induction is not in it."""

MIX: dict[str, Any] = dict(synthetic_fraction=0.6, task_weights=dict(
    math=0.35, recall=0.3, varassign_d0=0.15, varassign_d1=0.1, varassign_d2=0.1))
"""The pretraining mix of `midas.py` and `looped.py`: 60% of the tokens synthetic
(also `stackops_harness.corpus.MIX`).

The shares were chosen by the pilot runs recorded in `results/pilots/` (the default
preset's model and steps, baseline method): math is learned well above its floor; the
closed-book facts need about a third of the synthetic tokens to rise above theirs;
variable assignment stays below its floor (it keeps a share, so that a method that learns
the look-up sooner could show it); induction is left out.
"""

MIDAS_PRESETS: dict[str, dict[str, Any]] = {
    # About a minute: a tiny model, 3 stages; numbers mean nothing, the pipeline is exercised.
    "smoke": dict(
        train=dict(
            d_model=32, n_heads=2, depth=3, stages=3, seq_len=64, global_batch=8,
            total_steps=60, warmup_steps=6, lr=3e-3, eval_every=20, eval_batches=2,
            ckpt_every=0, log_every=10, keep_checkpoints=1,
        ),
        prim=dict(tasks=EVAL_TASKS, n_eval=16, greedy_n=8, ft_steps=4, ft_runs=2, ft_batch=8),
        corpus=dict(MIX, max_mb=2.0),
    ),
    # Training measured at ~9 min per seed for the three methods on 2 quiet CPU cores; the
    # primitive evaluation (last 3 evaluations, 500 prompts per task) adds its share,
    # reported per run as "eval share".
    "default": dict(
        train=dict(
            d_model=64, n_heads=4, depth=6, stages=6, seq_len=128, global_batch=16,
            total_steps=1500, warmup_steps=60, lr=3e-3, eval_every=150, eval_batches=8,
            ckpt_every=0, log_every=25, keep_checkpoints=1,
        ),
        prim=dict(tasks=EVAL_TASKS, n_eval=500, ft_steps=40, ft_runs=3, ft_batch=16),
        corpus=dict(MIX, max_mb=20.0),
    ),
    # An accelerator: 118M parameters at the final depth (24 layers of width 640), bf16.
    "gpu": dict(
        train=dict(
            d_model=640, n_heads=10, depth=24, stages=6, seq_len=512, global_batch=64,
            total_steps=20000, warmup_steps=500, lr=1e-3, eval_every=1000, eval_batches=16,
            eval_batch=32, ckpt_every=2000, log_every=50, compute_dtype="bfloat16",
        ),
        prim=dict(tasks=EVAL_TASKS, n_eval=1000, ft_steps=100, ft_runs=3, ft_batch=32,
                  max_len=512),
        corpus=dict(MIX, max_mb=20.0),
    ),
}
"""The presets of `stackops-midas`: `train` (flat `TrainConfig` fields), `prim`
(`stackops_harness.reasoning.PrimitiveEvalConfig`) and `corpus` (the mixed corpus)."""

LOOPED_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        train=dict(d_model=32, n_heads=2, seq_len=64, global_batch=8, total_steps=40,
                   warmup_steps=4, eval_every=20, eval_batches=2, ckpt_every=0, log_every=10,
                   keep_checkpoints=1),
        prim=dict(tasks=EVAL_TASKS, n_eval=16, ft_steps=4, ft_runs=2, ft_batch=8),
        corpus=dict(MIX, max_mb=2.0),
    ),
    "default": dict(
        train=dict(d_model=64, n_heads=4, seq_len=128, global_batch=16, total_steps=1000,
                   warmup_steps=50, eval_every=250, eval_batches=8, ckpt_every=0,
                   log_every=25, keep_checkpoints=1),
        prim=dict(tasks=EVAL_TASKS, n_eval=500, ft_steps=40, ft_runs=3, ft_batch=16),
        corpus=dict(MIX, max_mb=20.0),
    ),
}
"""The presets of `stackops-looped` (as `MIDAS_PRESETS`; the depth and stages come from
`--k` and `--loops`)."""
