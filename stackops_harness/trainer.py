"""The training loop: stagewise growth, sharded steps, evaluation, checkpoints and resume.

[`train`][] is the whole harness as one call; [`Trainer`][] is the same with the steps
exposed. A run

1. resolves the growth schedule (`stackops_harness.methods`) and dry-runs it on the abstract model,
   so a method that cannot grow this model fails before any work;
2. builds the mesh, the token files (the Python standard library by default), the grain
   iterator and the fixed validation batches;
3. resumes from the latest checkpoint in `run_dir` (manifest first, skeleton rebuilt at the
   saved stage, then arrays loaded into their shardings) or initialises stage 1 directly
   sharded;
4. steps: one jitted, ahead-of-time compiled step per stage; at a stage boundary it grows
   params and optimizer state inside one `jit` (shardings kept) and compiles the next
   stage's step once;
5. logs JSON lines (losses, counted FLOPs, wall time by activity), evaluates at fixed
   intervals, calls `on_eval` hooks, and checkpoints every `ckpt_every` steps, at every
   stage boundary (after growing) and at the end.

Within one process, compiled steps are cached by everything that determines them, so a
second run of the same shapes (another seed, another copying method) skips compilation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import stackops as so
from stackops.models import flops_per_token

from . import data
from .checkpoint import (
    CHECKPOINT_SUBDIR,
    CORRUPT_SUBDIR,
    CheckpointCorruptError,
    Checkpointer,
    check_manifest,
    make_manifest,
    write_json_atomic,
)
from .config import COMPILED_FIELDS, TrainConfig, config_to_dict
from .evaluate import EvalSet, make_eval_step
from .lock import RunLock, RunLockedError
from .methods import GrowthSchedule, growth_schedule
from .metrics import Clock, MetricsLog, MetricsSink, Progress, read_metrics
from .paths import data_root
from .provenance import provenance
from .sharding import batch_sharding, check_divisible, make_mesh, shard_rows
from .state import (
    Skeleton,
    check_schedule,
    grow_state,
    init_state,
    lm_config,
    make_optimizer,
    make_train_step,
    run_attention,
    skeleton,
)

__all__ = ["EvalHook", "TrainResult", "Trainer", "train", "prepare_data"]

EvalHook = Callable[[int, Any, dict[str, Any]], "Mapping[str, Any] | None"]
"""`on_eval(step, model, record)`: called at every evaluation with the current model (after
`step` updates) and the eval record so far; a returned mapping is merged into the record
(and so into `metrics.jsonl`). In a multi-process run it is called in every process."""


@dataclasses.dataclass
class TrainResult:
    """What [`train`][] returns.

    **Attributes:**

    - `model`: the final model (sharded arrays), or the model at `stop_after`.
    - `config`: the run's config.
    - `step`, `stage` (0-based), `depth`: where the run stopped.
    - `val_loss`: the last validation loss (from `metrics.jsonl` when this call evaluated
      nothing, e.g. it resumed a finished run).
    - `run_dir`, `metrics_path`: the run directory and its `metrics.jsonl`.
    - `manifest`: the manifest of the last checkpoint saved.
    """

    model: Any
    config: TrainConfig
    step: int
    stage: int
    depth: int
    val_loss: float | None
    run_dir: Path
    metrics_path: Path
    manifest: dict[str, Any]


def prepare_data(config: TrainConfig) -> Path:
    """The directory of the run's token files, building the default corpus on first use.

    With `config.data_dir` set, it must hold `train.bin` and `val.bin`. Otherwise the
    Python standard library's sources are tokenised into `data/stdlib/` of the repository
    (once; later runs reuse the files). In a multi-process run the first process builds
    and the others wait.

    !!! Example

        ```python
        import tempfile
        from pathlib import Path
        import numpy as np
        from stackops_harness import data
        from stackops_harness.config import preset

        d = tempfile.mkdtemp()
        data.write_tokens(f"{d}/train.bin", np.arange(1000) % 256)
        data.write_tokens(f"{d}/val.bin", np.arange(500) % 256)
        assert prepare_data(preset("smoke", data_dir=d)) == Path(d)
        ```
    """
    if config.data_dir:
        path = Path(config.data_dir)
        missing = [n for n in ("train.bin", "val.bin") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"TrainConfig.data_dir={config.data_dir!r} has no {' or '.join(missing)}; build "
                f"token files with `stackops-build-tokens --out {config.data_dir}` "
                "(add --src DIR for your own text)."
            )
        return path
    path = data_root() / "stdlib"
    ready = lambda: (path / "train.bin").is_file() and (path / "val.bin").is_file()
    if not ready() and jax.process_index() == 0:
        data.build_token_files(data.default_corpus_files(), path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("stackops:prepare_data")
    return path


# --------------------------------------------------------------------------- compile cache

_CACHE_SIZE = 32
_EXECUTABLES: OrderedDict[Hashable, Any] = OrderedDict()

def _compute_key(config: TrainConfig) -> tuple[Any, ...]:
    # The fields whose metadata says they change what a compiled step or growth computes.
    return tuple((name, getattr(config, name)) for name in sorted(COMPILED_FIELDS))


def _signature(sk: Skeleton) -> tuple[Any, ...]:
    def leaves(tree: Any) -> tuple[Any, ...]:
        return tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(tree))

    return (
        jax.tree.structure(sk.params),
        leaves(sk.params),
        jax.tree.structure(sk.opt_state),
        leaves(sk.opt_state),
        jax.tree.structure(sk.static),
    )


def _cached(key: Hashable, make: Callable[[], Any]) -> tuple[Any, bool]:
    try:
        hit = key in _EXECUTABLES
    except TypeError:  # an unhashable operator: no caching
        return make(), False
    if hit:
        _EXECUTABLES.move_to_end(key)
        return _EXECUTABLES[key], True
    value = make()
    _EXECUTABLES[key] = value
    while len(_EXECUTABLES) > _CACHE_SIZE:
        _EXECUTABLES.popitem(last=False)
    return value, False


def _enable_compile_cache(directory: str) -> None:
    if not directory or getattr(jax.config, "jax_compilation_cache_dir", None) == directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --------------------------------------------------------------------------- the run directory


def _check_writable(directory: Path, what: str) -> None:
    """Create, write, sync and remove a probe file in `directory`, or raise at once."""
    probe = directory / f".write-probe-{os.getpid()}-{jax.process_index()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"The {what} {directory} is not writable ({type(e).__name__}: {e.strerror or e}); "
            "fix its permissions or free space, or choose another --out / run_dir."
        ) from e


def _lock_run_dir(run_dir: Path) -> RunLock:
    """Check that `run_dir` is a writable directory and take its writer's lock (process 0;
    the other processes learn the outcome and fail with it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(
            f"The run directory (--out / run_dir) {run_dir} is a file, not a directory; "
            "give a new or existing directory path."
        )
    lock = RunLock(run_dir)
    error: BaseException | None = None
    if jax.process_index() == 0:
        try:
            _check_writable(run_dir, "run directory")
            if (run_dir / CHECKPOINT_SUBDIR).exists() and not (
                run_dir / CHECKPOINT_SUBDIR
            ).is_dir():
                raise NotADirectoryError(
                    f"{run_dir / CHECKPOINT_SUBDIR} is a file; the run keeps its checkpoints "
                    "in that directory. Move the file away or choose another --out / run_dir."
                )
            lock.acquire()
            _check_writable(run_dir / CHECKPOINT_SUBDIR, "checkpoint directory")
        except (OSError, RunLockedError) as e:
            lock.release()
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            raise RunLockedError(
                f"Process 0 could not open the run directory {run_dir} for writing (see its "
                "error)."
            )
    if error is not None:
        raise error
    if jax.process_index() != 0:
        _check_writable(run_dir / CHECKPOINT_SUBDIR, "checkpoint directory")
    return lock


# --------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class _Run:
    """Where a run stands: what the named steps of `Trainer.run` read and advance."""

    step: int
    stage: int
    sk: Skeleton
    params: Any
    opt_state: Any
    growth: list[dict[str, Any]]
    tokens: int
    flops: float
    stop: int
    window: dict[str, float]
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    train_step: Any = None
    eval_step: Any = None
    val_loss: float | None = None
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)  # last saved here


class Trainer:
    """A training run in `run_dir`: checked on construction, trained by [`Trainer.run`][].

    The constructor does no I/O: it checks the config, resolves the growth schedule
    (dry-run on the abstract model, so a method that cannot grow this model fails at once),
    the mesh and the optimizer. [`Trainer.open`][] (or `with Trainer(...) as trainer:`)
    takes the run directory's writer's lock, so that a second writer is refused, and opens
    the token files and the checkpoints; [`Trainer.close`][] releases them. `run()` opens
    and closes by itself when called on a trainer that is not open.

    **Arguments:**

    - `config`: the [`TrainConfig`][stackops_harness.config.TrainConfig].
    - `run_dir`: where `config.json`, `metrics.jsonl` and `checkpoints/` go.
    - `op`: with `config.method="custom"`, any `stackops` operator (used at every stage
      boundary) or a sequence of `stages - 1` operators, one per boundary.
    - `on_eval`: an [`EvalHook`][] or a sequence of them.
    - `mesh`: the device mesh (default: one `data` axis over all devices).
    - `sinks`: [`MetricsSink`][stackops_harness.metrics.MetricsSink]s that receive every
      metrics record too (e.g. a `TensorBoardSink`); closed with the trainer.

    !!! Example

        ```python
        import stackops as so
        from stackops_harness.config import preset

        def train_interpolated(run_dir):
            cfg = preset("smoke", method="custom")
            with Trainer(cfg, run_dir, op=so.interpolate(block=1, t=0.25)) as trainer:
                return trainer.run()
        ```
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        op: so.AbstractGrowth | Sequence[so.AbstractGrowth] | None = None,
        on_eval: EvalHook | Sequence[EvalHook] | None = None,
        mesh: Mesh | None = None,
        sinks: Sequence[MetricsSink] = (),
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}.")
        self.clock = Clock()
        self.config = config
        self.sinks = list(sinks)
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.is_main = jax.process_index() == 0
        self.lock: RunLock | None = None
        self.log: MetricsLog | None = None
        self.bar: Progress | None = None
        self.ckpt: Checkpointer | None = None
        if on_eval is None:
            self.hooks: list[EvalHook] = []
        elif callable(on_eval):
            self.hooks = [on_eval]
        else:
            self.hooks = list(on_eval)
        self.schedule: GrowthSchedule = growth_schedule(config, op)
        self.depths = check_schedule(config, self.schedule)
        self.mesh = mesh if mesh is not None else make_mesh()
        check_divisible(config.global_batch, self.mesh, "global_batch")
        check_divisible(config.eval_rows, self.mesh, "eval_batch")
        self.optimizer, self.lr_schedule = make_optimizer(config)
        self.attention, self.attention_fn = run_attention(config, self.mesh)

    # ------------------------------------------------------------------ opening and closing

    def open(self) -> Trainer:
        """Take the run directory's writer's lock (refused while another writer holds it),
        then open the token files (building the default corpus on first use), the data
        iterator, the validation batches and the checkpoints. Returns the trainer; a
        no-op when it is open already. On any error the lock is released again.
        """
        if self.lock is not None:
            return self
        self.lock = _lock_run_dir(self.run_dir)
        try:
            self._open_files()
        except BaseException:
            self.lock.release()
            self.lock = None
            raise
        return self

    def _open_files(self) -> None:
        config = self.config
        _enable_compile_cache(config.compile_cache)
        data_dir = prepare_data(config)
        # Verified against meta.json (dtype, length, SHA-256) and the vocabulary; the
        # checkpoint manifest records the hashes, so a resume on other data is refused.
        self.train_tokens, self.val_tokens, self.data_info = data.open_token_dir(
            data_dir, vocab_size=config.vocab_size
        )
        self.train_iter = data.make_train_iter(
            self.train_tokens,
            seq_len=config.seq_len,
            global_batch=config.global_batch,
            seed=config.data_seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.eval_set = EvalSet(
            data.make_eval_batches(
                self.val_tokens,
                seq_len=config.seq_len,
                batch=config.eval_rows,
                num_batches=config.eval_batches,
            ),
            self.mesh,
        )
        self.ckpt = Checkpointer(
            self.run_dir / CHECKPOINT_SUBDIR,
            keep=config.keep_checkpoints,
            async_save=config.async_checkpoints,
        )

    def __enter__(self) -> Trainer:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()

    def close(self) -> None:
        """Finish pending checkpoint writes, close files and release the run directory's
        lock (safe to call twice; a pending save's error is raised after all that)."""
        try:
            if self.bar is not None:
                self.bar.close()
            if self.log is not None:
                self.log.close()
            if self.ckpt is not None:
                ckpt, self.ckpt = self.ckpt, None
                ckpt.close()
        finally:
            if self.lock is not None:
                lock, self.lock = self.lock, None
                lock.release()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- the error that stopped the run is the one to report
            pass

    # ------------------------------------------------------------------ setup helpers

    def _resume_point(self, resume_from_intact: bool) -> tuple[Any, ...] | None:
        """`(manifest, skeleton, params, opt_state)` of the checkpoint to resume from, all
        verified (the data iterator restored in place), or `None` when there is none.

        A corrupt newest checkpoint is refused; with `resume_from_intact` the newest intact
        one is used instead and every newer step directory is moved (not deleted) to
        `corrupt-checkpoints/`, so that the steps can be saved again.
        """
        assert self.ckpt is not None
        steps = self.ckpt.steps()
        for i in range(len(steps) - 1, -1, -1):
            try:
                saved = self.ckpt.manifest(steps[i])
                check_manifest(
                    saved,
                    config=self.config,
                    schedule=self.schedule,
                    data_info=self.data_info,
                    where=str(self.run_dir),
                )
                if self.depths[int(saved["stage"])] != saved["depth"]:
                    raise CheckpointCorruptError(
                        f"The checkpoint {self.ckpt.step_dir(steps[i])} records depth "
                        f"{saved['depth']}, but its stage has {self.depths[int(saved['stage'])]} "
                        "blocks."
                    )
                sk = self._skeleton(int(saved["stage"]))
                params, opt_state = self.ckpt.restore(
                    steps[i], sk, self.train_iter, manifest=saved
                )
                return saved | {"_passed_over": steps[i + 1 :]}, sk, params, opt_state
            except CheckpointCorruptError as e:
                if not resume_from_intact:
                    raise
                self._corrupt_reasons.append(str(e))
        if steps:
            raise CheckpointCorruptError(
                f"No intact checkpoint in {self.ckpt.directory} (steps {steps}); the newest "
                f"failed with: {self._corrupt_reasons[0] if self._corrupt_reasons else '?'} "
                "Start a new run directory."
            )
        return None

    def _set_aside(self, steps: Sequence[int]) -> list[str]:
        """Move the step directories of `steps` to `corrupt-checkpoints/` (process 0)."""
        assert self.ckpt is not None
        moved = []
        if self.is_main and steps:
            dest = self.run_dir / CORRUPT_SUBDIR
            dest.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                target = dest / f"{step}-{stamp}"
                shutil.move(str(self.ckpt.step_dir(step)), str(target))
                moved.append(str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("stackops:set_aside")
        self.ckpt.close()
        self.ckpt = Checkpointer(
            self.run_dir / CHECKPOINT_SUBDIR,
            keep=self.config.keep_checkpoints,
            async_save=self.config.async_checkpoints,
        )
        return moved

    def _skeleton(self, stage: int) -> Skeleton:
        return skeleton(self.config, self.schedule, stage, self.mesh, self.optimizer)

    def _flops_per_step(self, stage: int) -> float:
        cfg = self.config
        fpt = flops_per_token(lm_config(cfg, self.depths[stage]), self.depths[stage], cfg.seq_len)
        return fpt * cfg.tokens_per_step

    def _compile(self, sk: Skeleton) -> tuple[Any, Any, bool]:
        """The AOT-compiled train and eval steps of a stage (cached within the process)."""
        cfg = self.config
        tokens = jax.ShapeDtypeStruct(
            (cfg.global_batch, cfg.seq_len + 1), np.int32, sharding=batch_sharding(self.mesh)
        )
        eval_tokens = jax.ShapeDtypeStruct(
            (cfg.eval_rows, cfg.seq_len + 1), np.int32, sharding=batch_sharding(self.mesh)
        )
        key = ("step", _compute_key(cfg), _signature(sk), self.mesh, cfg.eval_rows)

        def make() -> tuple[Any, Any]:
            step = make_train_step(cfg, sk, self.optimizer, self.mesh)
            evaluate = make_eval_step(
                sk.static,
                sk.param_shardings,
                self.mesh,
                compute_dtype=cfg.compute_dtype,
                unroll=cfg.unroll,
                attention=self.attention_fn,
            )
            return (
                step.lower(sk.params, sk.opt_state, tokens).compile(),
                evaluate.lower(sk.params, eval_tokens).compile(),
            )

        (train_step, eval_step), hit = _cached(key, make)
        return train_step, eval_step, hit

    def _grower(self, sk: Skeleton, next_sk: Skeleton, op: so.AbstractGrowth) -> Callable:
        cfg = self.config
        key = ("grow", op, cfg.preserve, cfg.opt_policy, _compute_key(cfg), _signature(sk))

        def make() -> Callable:
            return lambda p, o: grow_state(p, o, sk, op, cfg, self.optimizer, next_sk)

        return _cached(key, make)[0]

    # ------------------------------------------------------------------ the run

    def run(
        self,
        *,
        stop_after: int | None = None,
        resume: bool = True,
        resume_from_intact: bool = False,
    ) -> TrainResult:
        """Train to `config.total_steps` (or to `stop_after` steps), resuming if possible.

        A trainer that is not open is opened first and closed at the end (also on an
        error), so the run directory is locked exactly while it trains.

        **Arguments:**

        - `stop_after`: stop (with a checkpoint) once this many steps are done (a positive
          int); the run can be resumed later and ends exactly as an uninterrupted one.
        - `resume`: continue from the latest checkpoint in `run_dir` if there is one;
          `False` raises when there is one (start a new directory instead).
        - `resume_from_intact`: when the latest checkpoint is corrupt, resume from the
          newest intact one (the newer step directories are moved to
          `corrupt-checkpoints/`, never deleted). Without it a corrupt checkpoint raises
          [`CheckpointCorruptError`][stackops_harness.checkpoint.CheckpointCorruptError].

        **Returns:** a [`TrainResult`][].
        """
        if stop_after is not None and (
            isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
        ):
            raise ValueError(
                f"`stop_after` (--stop-after) must be a positive number of steps, got "
                f"{stop_after!r}; leave it unset to train to total_steps."
            )
        if self.lock is not None:
            return self._run(stop_after, resume, resume_from_intact)
        with self:
            return self._run(stop_after, resume, resume_from_intact)

    def _run(self, stop_after: int | None, resume: bool, resume_from_intact: bool) -> TrainResult:
        """The loop: train a step; at its points evaluate, grow and checkpoint."""
        cfg, sched = self.config, self.schedule
        run = self._start(stop_after, resume, resume_from_intact)
        if run.step == 0 and run.stop > 0:
            self._compile_stage(run)
            self._evaluate(run)
        while run.step < run.stop:
            self._train(run)
            boundary = run.stage + 1 < sched.num_stages and run.step == sched.starts[run.stage + 1]
            eval_due = (cfg.eval_every > 0 and run.step % cfg.eval_every == 0) or (
                run.step == sched.total_steps
            )
            ckpt_due = (
                (cfg.ckpt_every > 0 and run.step % cfg.ckpt_every == 0)
                or boundary
                or run.step == run.stop
            )
            if run.step % cfg.log_every == 0 or eval_due or ckpt_due:
                self._flush_train(run)
            if eval_due:
                self._evaluate(run)
            if boundary:
                self._grow(run)
            if ckpt_due:
                self._checkpoint(run)
        return self._finish(run)

    def _start(self, stop_after: int | None, resume: bool, resume_from_intact: bool) -> _Run:
        """Resume from the latest checkpoint or initialise stage 1; write config.json and the
        `start` / `resume` record."""
        assert self.ckpt is not None
        cfg, sched = self.config, self.schedule
        latest = self.ckpt.latest_step()
        if latest is not None and not resume:
            raise ValueError(
                f"{self.run_dir} already holds checkpoints (latest step {latest}); pass "
                "resume=True to continue that run, or choose a new run directory."
            )
        self._corrupt_reasons: list[str] = []
        point = self._resume_point(resume_from_intact) if latest is not None else None
        set_aside: list[str] = []
        if point is not None:
            saved, sk, params, opt_state = point
            if saved["_passed_over"]:
                set_aside = self._set_aside(saved["_passed_over"])
            if self.is_main and not (self.run_dir / "config.json").is_file():
                write_json_atomic(self.run_dir / "config.json", config_to_dict(cfg))
            step, stage = int(saved["step"]), int(saved["stage"])
            growth = list(saved["growth"])
            counters = dict(saved["counters"])
            self.clock.restore(counters.get("time", {}))
            self.log = MetricsLog(
                self.metrics_path, keep_until=step, enabled=self.is_main, sinks=self.sinks
            )
            event = "resume"
        else:
            if self.is_main:
                config_json = {**config_to_dict(cfg), "provenance": provenance()}
                write_json_atomic(self.run_dir / "config.json", config_json)
            step, stage = 0, 0
            sk = self._skeleton(0)
            params, opt_state = init_state(cfg, sk, self.optimizer, sched.initial_depth)
            growth = []
            counters = {"tokens": 0, "flops": 0.0}
            self.log = MetricsLog(
                self.metrics_path, keep_until=None, enabled=self.is_main, sinks=self.sinks
            )
            event = "start"
        self.clock.lap("init")
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sk.params))
        self.log.write(
            {
                "kind": event,
                "step": step,
                "stage": stage + 1,
                "depth": sk.depth,
                "params": num_params,
                "method": cfg.method,
                "stage_lengths": list(sched.lengths),
                "depths": list(self.depths),
                "ops": [repr(op) for op in sched.ops],
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "backend": jax.default_backend(),
                "attention": self.attention,
                "pid": os.getpid(),
                **(
                    {"set_aside": set_aside, "corrupt": self._corrupt_reasons}
                    if set_aside
                    else {}
                ),
                "provenance": provenance(),
            }
        )
        self.bar = Progress(sched.total_steps, step, enabled=cfg.progress and self.is_main)
        total = sched.total_steps
        return _Run(
            step=step,
            stage=stage,
            sk=sk,
            params=params,
            opt_state=opt_state,
            growth=growth,
            tokens=int(counters["tokens"]),
            flops=float(counters["flops"]),
            stop=total if stop_after is None else max(min(stop_after, total), step),
            window={"tokens": 0, "flops": 0.0, "time": self.clock.totals["train"]},
        )

    def _compile_stage(self, run: _Run) -> None:
        """Compile (or take from the cache) the current stage's train and eval steps."""
        assert self.log is not None
        run.train_step, run.eval_step, hit = self._compile(run.sk)
        seconds = self.clock.lap("compile")
        self.log.write(
            {
                "kind": "compile",
                "step": run.step,
                "stage": run.stage + 1,
                "depth": run.sk.depth,
                "seconds": seconds,
                "cached": hit,
            }
        )

    def _train(self, run: _Run) -> None:
        """One optimiser step on the next batch (compiling the stage's step first if needed);
        its metrics stay on the device until `_flush_train`."""
        assert self.bar is not None and self.ckpt is not None
        if run.train_step is None:
            self._compile_stage(run)
        batch = shard_rows(next(self.train_iter)["tokens"], self.mesh)
        run.params, run.opt_state, step_metrics = run.train_step(run.params, run.opt_state, batch)
        run.step += 1
        flops = self._flops_per_step(run.stage)
        run.tokens += self.config.tokens_per_step
        run.flops += flops
        run.window["tokens"] += self.config.tokens_per_step
        run.window["flops"] += flops
        run.pending.append(step_metrics)
        self.bar.update(1)
        self.ckpt.check()  # a failed background save stops the run now, not minutes later

    def _flush_train(self, run: _Run) -> None:
        """Write one `train` record for the steps since the last (one device sync)."""
        assert self.log is not None and self.bar is not None
        if not run.pending:
            self.clock.lap("train")
            return
        values = jax.device_get(run.pending)
        run.pending.clear()
        self.clock.lap("train")
        losses = [float(v["loss"]) for v in values]
        loss = sum(losses) / len(losses)
        dt = self.clock.totals["train"] - run.window["time"]
        record: dict[str, Any] = {
            "kind": "train",
            "step": run.step,
            "stage": run.stage + 1,
            "depth": run.sk.depth,
            "loss": loss,
            "loss_last": losses[-1],
            "grad_norm": float(values[-1]["grad_norm"]),
            "lr": float(self.lr_schedule(run.step - 1)),
            "tokens": run.tokens,
            "flops": run.flops,
            "tokens_per_s": run.window["tokens"] / dt if dt > 0 else None,
            "flops_per_s": run.window["flops"] / dt if dt > 0 else None,
            **self.clock.as_record(),
        }
        run.window.update(tokens=0, flops=0.0, time=self.clock.totals["train"])
        self.log.write(record)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The training loss is {loss} at step {run.step}; lower "
                "TrainConfig.lr or raise warmup_steps."
            )
        self.bar.update(
            0,
            loss=loss,
            stage=f"{run.stage + 1}/{self.schedule.num_stages}",
            depth=run.sk.depth,
            tok_s=record["tokens_per_s"] or 0.0,
        )

    def _evaluate(self, run: _Run) -> None:
        """The validation loss on the fixed batches, the `on_eval` hooks, an `eval` record."""
        assert self.log is not None and self.bar is not None
        assert run.eval_step is not None  # compiled at the start of every stage
        loss = self.eval_set.loss(run.eval_step, run.params)
        record: dict[str, Any] = {
            "kind": "eval",
            "step": run.step,
            "stage": run.stage + 1,
            "depth": run.sk.depth,
            "val_loss": loss,
            "tokens": run.tokens,
            "flops": run.flops,
        }
        for hook in self.hooks:
            extra = hook(run.step, run.sk.model(run.params), dict(record))
            if extra:
                record.update(extra)
        self.log.write({**record, **self.clock.as_record()})
        self.bar.write(
            f"step {run.step}: stage {run.stage + 1} depth {run.sk.depth} val_loss {loss:.4f}"
        )
        self.clock.lap("eval")
        run.val_loss = loss

    def _grow(self, run: _Run) -> None:
        """Grow params and optimizer state into the next stage (one `jit`, shardings kept)."""
        assert self.log is not None and self.bar is not None
        sk, next_sk = run.sk, self._skeleton(run.stage + 1)
        op = self.schedule.ops[run.stage]
        run.params, run.opt_state = self._grower(sk, next_sk, op)(run.params, run.opt_state)
        jax.block_until_ready((run.params, run.opt_state))
        seconds = self.clock.lap("grow")
        grown = {
            "step": run.step,
            "stage": run.stage + 2,
            "op": repr(op),
            "depth_from": sk.depth,
            "depth_to": next_sk.depth,
            "seconds": seconds,
        }
        run.growth.append(grown)
        self.log.write({"kind": "grow", **grown})
        self.bar.write(f"step {run.step}: grew {sk.depth} -> {next_sk.depth} blocks with {op!r}")
        run.stage, run.sk = run.stage + 1, next_sk
        run.train_step = run.eval_step = None

    def _checkpoint(self, run: _Run) -> None:
        """Save params, optimizer and data-iterator state with the manifest (asynchronously
        where configured)."""
        assert self.log is not None and self.ckpt is not None
        manifest = make_manifest(
            config=self.config,
            schedule=self.schedule,
            step=run.step,
            stage=run.stage,
            depth=run.sk.depth,
            growth=run.growth,
            counters={"tokens": run.tokens, "flops": run.flops, "time": dict(self.clock.totals)},
            data_info=self.data_info,
        )
        self.ckpt.save(run.step, run.params, run.opt_state, self.train_iter, manifest)
        seconds = self.clock.lap("ckpt")
        self.log.write({"kind": "checkpoint", "step": run.step, "seconds": seconds})
        run.manifest = manifest

    def _finish(self, run: _Run) -> TrainResult:
        """Flush, wait for the saves, write the `end` record and return the result."""
        assert self.log is not None and self.ckpt is not None
        self._flush_train(run)
        self.ckpt.wait()
        self.clock.lap("ckpt")
        manifest = run.manifest
        if not manifest and self.ckpt.latest_step() is not None:
            manifest = self.ckpt.manifest()
        val_loss = run.val_loss
        if val_loss is None and self.metrics_path.exists():
            # Nothing evaluated in this call (a finished run resumed): report the last one.
            evals = [r for r in read_metrics(self.metrics_path, "eval") if r["step"] <= run.step]
            val_loss = evals[-1]["val_loss"] if evals else None
        self.log.write(
            {
                "kind": "end",
                "step": run.step,
                "stage": run.stage + 1,
                "depth": run.sk.depth,
                "val_loss": val_loss,
                "tokens": run.tokens,
                "flops": run.flops,
                **self.clock.as_record(),
            }
        )
        return TrainResult(
            model=run.sk.model(run.params),
            config=self.config,
            step=run.step,
            stage=run.stage,
            depth=run.sk.depth,
            val_loss=val_loss,
            run_dir=self.run_dir,
            metrics_path=self.metrics_path,
            manifest=manifest,
        )


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    op: so.AbstractGrowth | Sequence[so.AbstractGrowth] | None = None,
    on_eval: EvalHook | Sequence[EvalHook] | None = None,
    stop_after: int | None = None,
    resume: bool = True,
    resume_from_intact: bool = False,
    mesh: Mesh | None = None,
    sinks: Sequence[MetricsSink] = (),
) -> TrainResult:
    """Train the reference LM under `config` in `run_dir`, resuming if it holds checkpoints.

    **Arguments:**

    - `config`: a [`TrainConfig`][stackops_harness.config.TrainConfig] (e.g. `preset("smoke")`).
    - `run_dir`: the run directory (created if needed).
    - `op`: with `method="custom"`, any `stackops` operator, or one per boundary.
    - `on_eval`: hook(s) `on_eval(step, model, record) -> dict | None` called at every
      evaluation; returned values are logged with the validation loss.
    - `stop_after`: stop after this many steps (with a checkpoint), to resume later.
    - `resume`: continue from the latest checkpoint (default); `False` refuses a directory
      that holds one.
    - `resume_from_intact`: if the latest checkpoint is corrupt, resume from the newest
      intact one (newer steps are moved to `corrupt-checkpoints/`); by default a corrupt
      checkpoint is refused.
    - `mesh`: the device mesh (default: all devices on one `data` axis).
    - `sinks`: [`MetricsSink`][stackops_harness.metrics.MetricsSink]s that receive every
      metrics record besides `metrics.jsonl` (e.g. `TensorBoardSink(f"{run_dir}/tb")`).

    **Returns:** a [`TrainResult`][] (final model, metrics path, last manifest, ...).

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.trainer import train

        def smoke_midas(run_dir):
            result = train(preset("smoke", method="midas"), run_dir)
            print(result.val_loss, result.depth, result.metrics_path)
            return result.model
        ```
    """
    trainer = Trainer(config, run_dir, op=op, on_eval=on_eval, mesh=mesh, sinks=sinks)
    with trainer:
        return trainer.run(
            stop_after=stop_after, resume=resume, resume_from_intact=resume_from_intact
        )
