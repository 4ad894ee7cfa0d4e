"""Checkpoints with orbax: params, optimizer state, data-iterator state and a JSON manifest.

A checkpoint is one step directory under `run_dir/checkpoints/` holding four items:
`params` and `opt_state` (orbax `StandardSave`, sharded arrays), `data` (the grain
iterator's state, one file per process) and `meta` (the manifest: config, step, stage,
depth, growth history, counters). orbax writes a step into a temporary directory and
renames it when every item is complete, so a process killed at any moment, even during a
save, leaves only complete checkpoints visible; leftovers are removed when the run's writer
reopens it. Readers ([`load_checkpoint`][], `Checkpointer(..., read_only=True)`) never
remove or change anything, so they may read a live run.

Every checkpoint verifies itself: at save time each array's checksum (two 32-bit sums over
its bits, computed on device, the same whatever the sharding or number of processes) and
the data iterator's state go into the manifest, and the manifest carries the SHA-256 of its
own content. Restoring recomputes all of them, and checks the manifest's counters (step,
stage, depth, growth history, tokens) against the schedule and the arrays, so a flipped
bit anywhere is refused with [`CheckpointCorruptError`][], naming the array and the step
directory, instead of being trained on.

Restoring never guesses: the manifest is read first, the model's skeleton at the saved
stage is rebuilt from the config and the growth history it records, the saved arrays'
names and shapes are checked against that skeleton, and only then are they loaded, each
straight into its sharding. Anything that does not match raises
[`CheckpointMismatchError`][] naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import stackops as so

from .config import TrainConfig, config_diff, config_from_dict
from .methods import GrowthSchedule, growth_schedule
from .sharding import make_mesh
from .state import Skeleton, make_optimizer, skeleton

__all__ = [
    "MANIFEST_FORMAT",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "Checkpointer",
    "check_counters",
    "check_manifest",
    "tree_checksums",
    "load_checkpoint",
    "make_manifest",
    "write_json_atomic",
]

MANIFEST_FORMAT = "stackops-train-checkpoint/2"
CHECKSUM_FORMAT = "stackops-u32x2/1"
CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt-checkpoints"
"""Where `resume_from_intact` moves the step directories it passes over (nothing is deleted)."""

INTACT_FIX = (
    "To resume from the newest intact checkpoint before it, rerun with --resume-from-intact "
    "(train(..., resume_from_intact=True)): the steps passed over are moved to "
    f"{CORRUPT_SUBDIR}/ of the run directory, nothing is deleted."
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: missing, incomplete or corrupt."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not hold what was saved: a checksum, the manifest's own hash,
    its counters or the data-iterator state disagree, or a file cannot be decoded."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this run: another config, model, data or method."""


class Checkpointer:
    """Saves and restores training checkpoints in `directory` with an orbax CheckpointManager.

    **Arguments:**

    - `directory`: where step directories go (`run_dir / "checkpoints"`).
    - `keep`: how many of the latest checkpoints to keep.
    - `async_save`: write in a background thread (arrays are copied to host memory before
      `save` returns, so training may go on and even donate the buffers). The first error
      of a background write is raised by the next [`Checkpointer.check`][] (the trainer
      calls it after every step), `save`, `wait` or `close`.
    - `read_only`: open for reading only: nothing in `directory` is created, cleaned or
      deleted (a reader of a live run must not touch the writer's in-flight saves), and
      `save` raises.

    !!! Example

        ```python
        def save_and_restore(run_dir, step, params, opt_state, data_iter, manifest, sk):
            ckpt = Checkpointer(f"{run_dir}/checkpoints", keep=3)
            ckpt.save(step, params, opt_state, data_iter, manifest)
            ckpt.wait()
            restored = ckpt.restore(step, sk, data_iter)   # (params, opt_state), verified
            ckpt.close()
            return restored
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self._pending: int | None = None  # the step of the last save started
        if read_only:
            if not self.directory.is_dir():
                raise CheckpointError(f"There is no checkpoint directory {self.directory}.")
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0
            )
        else:
            if jax.process_index() == 0 and self.directory.is_dir():
                # A save cut short by a crash leaves `<step>.orbax-checkpoint-tmp*`: never a
                # checkpoint, so the run's one writer (it holds the run's lock) removes it.
                for leftover in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
                # Directories made in `save` itself: an unwritable directory fails there, at
                # once, instead of in a background wait that times out after minutes.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns that the directory is read-only: that is the point
            absl_log.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        finally:
            absl_log.setLevel(level)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        if self.read_only:
            self.manager.reload()  # a live writer may have added or removed steps
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or `None`."""
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        """The directory of the checkpoint at `step`."""
        return self.directory / str(step)

    def save(
        self, step: int, params: Any, opt_state: Any, data_iter: Any, manifest: Mapping[str, Any]
    ) -> None:
        """Start saving a checkpoint at `step` (returns once the arrays are on the host).

        The manifest saved is `manifest` plus the checksum of every array, the data
        iterator's state and the SHA-256 of the manifest itself.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; it cannot save.")
        self.check()
        full = dict(manifest)
        # One reduction program for both trees (one compilation per stage, not two).
        sums = tree_checksums({"params": params, "opt_state": opt_state})
        full["checksums"] = {"format": CHECKSUM_FORMAT}
        for item in ("params", "opt_state"):
            prefix = f"{item}."
            full["checksums"][item] = {
                k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)
            }
        full["data_state"] = _jsonable_state(data_iter.get_state())
        full["manifest_sha256"] = _manifest_hash(full)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(full),
        )
        try:
            self.manager.save(step, args=args, force=True)
            self._pending = step
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise CheckpointError(
                f"Saving the checkpoint at step {step} in {self.directory} failed "
                f"({type(e).__name__}: {e}). Check that the directory is writable and has "
                "space, then rerun the same command: it resumes from the last checkpoint."
            ) from e

    def _background_failure(self, e: Exception) -> CheckpointError:
        return CheckpointError(
            f"A background checkpoint save in {self.directory} failed "
            f"({type(e).__name__}: {e}). Check that the directory is writable and has "
            "space, then rerun the same command: it resumes from the last checkpoint."
        )

    def check(self) -> None:
        """Raise [`CheckpointError`][] now if a background save has failed (cheap)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise self._background_failure(e) from e
        # orbax's own finalisation may consume a background error (it logs it and clears
        # it), so also check the outcome: once no save is in flight, the last one must have
        # been committed (renamed to its step directory).
        step = self._pending
        if step is None or self.manager.is_saving_in_progress():
            return
        self._pending = None
        if jax.process_index() == 0 and not self.step_dir(step).is_dir():
            raise CheckpointError(
                f"The background save of the checkpoint at step {step} in {self.directory} "
                "failed (its step directory was never committed; orbax logged the cause "
                "above). Check that the directory is writable and has space, then rerun the "
                "same command: it resumes from the last checkpoint."
            )

    def manifest(self, step: int | None = None) -> dict[str, Any]:
        """The manifest of the checkpoint at `step` (default: the latest), its own hash
        verified."""
        step = self._step(step)
        where = self.step_dir(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            manifest = out["meta"]
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            if not where.is_dir():
                raise CheckpointError(
                    f"The checkpoint {where} disappeared while being read (a live run keeps "
                    "only its latest checkpoints); read again."
                ) from e
            raise CheckpointCorruptError(
                f"The checkpoint {where} has no readable manifest ({type(e).__name__}: {e}): "
                f"it is corrupt or incomplete. {INTACT_FIX}"
            ) from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
            raise CheckpointCorruptError(
                f"The checkpoint {where} has a manifest of format {found!r}, not "
                f"{MANIFEST_FORMAT!r}: it is corrupt or was not written by this version of "
                f"the harness. {INTACT_FIX}"
            )
        recorded = manifest.get("manifest_sha256")
        if recorded != _manifest_hash(manifest):
            raise CheckpointCorruptError(
                f"The manifest of the checkpoint {where} (meta/metadata) does not match its "
                f"recorded SHA-256: it was altered after it was saved. {INTACT_FIX}"
            )
        if manifest.get("step") != step:
            raise CheckpointCorruptError(
                f"The checkpoint {where} records step {manifest.get('step')!r}: it is not the "
                f"step its directory names. {INTACT_FIX}"
            )
        return manifest

    def restore(
        self,
        step: int,
        sk: Skeleton,
        data_iter: Any = None,
        *,
        opt_state: bool = True,
        manifest: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any]:
        """Load params (and optimizer and data-iterator state) into the skeleton `sk`,
        verified against the manifest's checksums.

        The saved arrays' names and shapes are compared with the skeleton's first, so a
        checkpoint of another model raises [`CheckpointMismatchError`][] naming the arrays
        that differ instead of restoring part of it. After loading, every array's checksum
        and the data iterator's state are compared with those recorded at save time; a
        difference raises [`CheckpointCorruptError`][] naming the array and the step
        directory. `data_iter` is restored in place.

        **Returns:** `(params, opt_state)`; `opt_state` is `None` with `opt_state=False`.
        """
        where = self.step_dir(step)
        if manifest is None:
            manifest = self.manifest(step)
        self._check_arrays(step, "params", sk.params)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(sk.params)}
        if opt_state:
            self._check_arrays(step, "opt_state", sk.opt_state)
            items["opt_state"] = ocp.args.StandardRestore(sk.opt_state)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            if not where.is_dir():
                raise CheckpointError(
                    f"The checkpoint {where} disappeared while being read (a live run keeps "
                    "only its latest checkpoints); read again."
                ) from e
            raise CheckpointCorruptError(
                f"Restoring the checkpoint {where} failed ({type(e).__name__}: {e}): it is "
                f"corrupt or incomplete. {INTACT_FIX}"
            ) from e
        checksums = manifest.get("checksums") or {}
        if checksums.get("format") != CHECKSUM_FORMAT:
            raise CheckpointCorruptError(
                f"The manifest of {where} has no checksums of format {CHECKSUM_FORMAT!r}. "
                f"{INTACT_FIX}"
            )
        names = ["params"] + (["opt_state"] if opt_state else [])
        _verify_checksums({k: out[k] for k in names}, checksums, where)
        if data_iter is not None:
            state = _jsonable_state(data_iter.get_state())
            if state != manifest.get("data_state"):
                raise CheckpointCorruptError(
                    f"The data-iterator state restored from {where / 'data'} is {state}, but "
                    f"the manifest recorded {manifest.get('data_state')}: the checkpoint is "
                    f"corrupt. {INTACT_FIX}"
                )
        return out["params"], (out["opt_state"] if opt_state else None)

    def wait(self) -> None:
        """Block until every pending save is complete on disk (raising its error, if any)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise self._background_failure(e) from e
        self.check()

    def close(self) -> None:
        """Finish pending saves and release the manager (its save error, if any, raised
        after the manager is released)."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 -- the save error above is the one that matters
                pass

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"There is no complete checkpoint in {self.directory}.")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"There is no checkpoint at step {step} in {self.directory}; saved steps: {steps}."
            )
        return step

    def _check_arrays(self, step: int, item: str, template: Any) -> None:
        where = self.step_dir(step)
        try:
            meta = self.manager.item_metadata(step)[item]
            if meta is None:
                raise ValueError("no metadata")
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise CheckpointCorruptError(
                f"The checkpoint {where} has no readable {item!r} ({type(e).__name__}: {e}): "
                f"it is corrupt or incomplete. {INTACT_FIX}"
            ) from e
        saved = {
            m.name: (tuple(m.shape), str(m.dtype))
            for m in jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "shape"))
            if hasattr(m, "shape")
        }
        wanted = {
            _orbax_name(path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(template)
        }
        problems = [f"{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
        problems += [
            f"{k}: in the checkpoint but not in the model" for k in sorted(set(saved) - set(wanted))
        ]
        problems += [
            f"{k}: saved {saved[k][0]} {saved[k][1]}, model has {wanted[k][0]} {wanted[k][1]}"
            for k in sorted(set(saved) & set(wanted))
            if saved[k] != wanted[k]
        ]
        if problems:
            shown = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
            raise CheckpointMismatchError(
                f"The {item!r} saved in {where} do not match the model rebuilt from its "
                f"manifest ({len(problems)} arrays differ):\n  {shown}\nIf this checkpoint "
                "belongs to this run, its array metadata is damaged: "
                f"{INTACT_FIX}"
            )


# --------------------------------------------------------------------------- checksums

_GOLDEN = np.uint32(0x9E3779B1)
_MIX = np.uint32(0x85EBCA77)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    # Two sums mod 2**32 over the array's bits as unsigned words: words times odd weights
    # (so a change of any one word, e.g. one flipped bit, changes the sum: an odd number
    # times a nonzero difference below 2**32 is nonzero mod 2**32), and a position-keyed
    # bijective mix of each word (so two changes rarely cancel in both). Integer addition
    # is associative, so the result does not depend on sharding or reduction order.
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2 words
    elif x.dtype.itemsize == 4:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        word = {2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis)
        idx = idx + iota * np.uint32(stride % 2**32)
        stride *= u.shape[axis]
    h1 = jnp.sum(u * (idx * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    m = (u ^ (idx * _GOLDEN)) * ((idx * _MIX) | np.uint32(1))
    m = m ^ (m >> np.uint32(15))
    h2 = jnp.sum(m, dtype=jnp.uint32)
    return jnp.stack([h1, h2 + np.uint32(stride % 2**32)])


_tree_checksum_fn = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree: Any) -> dict[str, str]:
    """The checksum of every array in `tree`, by its orbax name: `{name: 16 hex digits}`.

    Computed on device from the arrays' bits (sharded arrays in place, the same value in
    every process), so it costs one small reduction per array, not a copy to the host.
    Any single flipped bit changes it.

    **Arguments:**

    - `tree`: a pytree of JAX arrays (params, optimizer state).

    **Returns:** a dict from each leaf's path (as orbax names it) to its checksum.

    !!! Example

        ```python
        import jax.numpy as jnp

        a = {"w": jnp.arange(6.0).reshape(2, 3)}
        b = {"w": a["w"].at[1, 2].set(jnp.nextafter(5.0, 6.0))}   # one bit differs
        assert tree_checksums(a) != tree_checksums(b)
        assert tree_checksums(a) == tree_checksums({"w": jnp.arange(6.0).reshape(2, 3)})
        ```
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    names = [_orbax_name(path) for path, _ in leaves]
    sums = _tree_checksum_fn([x for _, x in leaves])
    out = {}
    for name, s in zip(names, sums):
        if s.is_fully_replicated:  # every process holds the whole (tiny) result
            h = np.asarray(s.addressable_shards[0].data)
        else:
            h = np.asarray(multihost_utils.process_allgather(s, tiled=True))
        out[name] = f"{int(h[0]):08x}{int(h[1]):08x}"
    return out


def _verify_checksums(trees: dict[str, Any], recorded: Mapping[str, Any], where: Path) -> None:
    now = tree_checksums(trees)
    saved: dict[str, Any] = {}
    for item in trees:
        if not isinstance(recorded.get(item), dict):
            raise CheckpointCorruptError(
                f"The manifest of {where} has no checksums for {item!r}. {INTACT_FIX}"
            )
        saved.update({f"{item}.{k}": v for k, v in recorded[item].items()})
    bad = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if bad:
        raise CheckpointCorruptError(
            f"The checkpoint {where} is corrupt: the array(s) {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''} do not match the checksums recorded when it was "
            f"saved (e.g. {bad[0]}: saved {saved.get(bad[0])}, read {now.get(bad[0])}). "
            f"{INTACT_FIX}"
        )


def _jsonable_state(state: Any) -> Any:
    return json.loads(json.dumps(state, sort_keys=True, default=str))


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _orbax_name(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def make_manifest(
    *,
    config: TrainConfig,
    schedule: GrowthSchedule,
    step: int,
    stage: int,
    depth: int,
    growth: Sequence[Mapping[str, Any]],
    counters: Mapping[str, Any],
    data_info: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON manifest saved with every checkpoint (`stage` 0-based here, as everywhere in
    the harness's Python API; metrics show it 1-based).

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule

        cfg = preset("smoke")
        man = make_manifest(config=cfg, schedule=growth_schedule(cfg), step=0, stage=0, depth=1,
                            growth=[], counters={}, data_info={})
        assert man["format"] == MANIFEST_FORMAT and man["ops"][0].startswith("middle_stack")
        ```
    """
    from .config import config_to_dict

    return {
        "format": MANIFEST_FORMAT,
        "step": step,
        "stage": stage,
        "depth": depth,
        "num_stages": schedule.num_stages,
        "stage_lengths": list(schedule.lengths),
        "method": config.method,
        "ops": [repr(op) for op in schedule.ops],
        "growth": [dict(g) for g in growth],
        "config": config_to_dict(config),
        "counters": dict(counters),
        "data": dict(data_info),
        "process_count": jax.process_count(),
        "versions": {"stackops": so.__version__, "jax": jax.__version__},
    }


def check_manifest(
    manifest: Mapping[str, Any],
    *,
    config: TrainConfig,
    schedule: GrowthSchedule,
    data_info: Mapping[str, Any] | None,
    where: str,
    restoring_data: bool = True,
) -> None:
    """Raise [`CheckpointMismatchError`][] unless the checkpoint belongs to this run.

    Compared: the config (all fields but `RESUMABLE_FIELDS`), the growth operators of the
    stages done so far, the token files' sizes, and the number of processes (each saved its
    own data-iterator state).

    !!! Example

        ```python
        from stackops_harness.methods import growth_schedule

        def check_resumable(run_dir, cfg):
            manifest = Checkpointer(f"{run_dir}/checkpoints").manifest()
            check_manifest(
                manifest, config=cfg, schedule=growth_schedule(cfg), data_info=None, where=run_dir
            )
        ```
    """
    try:
        diff = config_diff(manifest["config"], config)
    except (ValueError, TypeError) as e:
        raise CheckpointMismatchError(
            f"The checkpoint in {where} (step {manifest['step']}) holds a config this harness "
            f"cannot read: {e}"
        ) from None
    if diff:
        lines = "\n  ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(
            f"The checkpoint in {where} (step {manifest['step']}) was made with a different "
            f"config; these fields differ:\n  {lines}\nResume with the saved config "
            "(config.json in the run directory, without these overrides) or use a new run "
            "directory."
        )
    stage = int(manifest["stage"])
    done = list(manifest["ops"])[:stage]
    now = [repr(op) for op in schedule.ops[:stage]]
    if done != now:
        raise CheckpointMismatchError(
            f"The checkpoint in {where} (step {manifest['step']}, stage {stage + 1}) was grown "
            f"with the operators {done}, but this run would grow with {now}. Pass the same "
            "operator (train(..., op=...)) as the run that made it."
        )
    check_counters(manifest, config=config, schedule=schedule, where=where)
    if data_info is not None and dict(manifest.get("data") or {}) != dict(data_info):
        saved = dict(manifest.get("data") or {})
        differ = sorted(k for k in set(saved) | set(data_info) if saved.get(k) != data_info.get(k))
        raise CheckpointMismatchError(
            f"The checkpoint in {where} (step {manifest['step']}) was trained on other token "
            f"files: {', '.join(differ)} differ (saved {[saved.get(k) for k in differ]}, now "
            f"{[data_info.get(k) for k in differ]}). Point data_dir (--data-dir) at the data "
            "the run was trained on, or start a new run directory."
        )
    if restoring_data and int(manifest.get("process_count", 1)) != jax.process_count():
        raise CheckpointMismatchError(
            f"The checkpoint in {where} was saved by {manifest['process_count']} processes, and "
            f"each saved its own data-iterator state; resume it with "
            f"{manifest['process_count']} processes, not {jax.process_count()}."
        )


def check_counters(
    manifest: Mapping[str, Any], *, config: TrainConfig, schedule: GrowthSchedule, where: str
) -> None:
    """Raise [`CheckpointCorruptError`][] unless the manifest's counters agree with the
    schedule: the stage of its step, one growth event per boundary passed (at the boundary's
    step, with its operator, each depth following on from the last) ending at the recorded
    depth, and the tokens trained so far.

    !!! Example

        ```python
        from stackops_harness.config import preset
        from stackops_harness.methods import growth_schedule

        cfg = preset("smoke")
        man = make_manifest(config=cfg, schedule=growth_schedule(cfg), step=0, stage=0, depth=1,
                            growth=[], counters={"tokens": 0}, data_info={})
        check_counters(man, config=cfg, schedule=growth_schedule(cfg), where="run")
        ```
    """

    def bad(what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"The manifest of the checkpoint at step {manifest.get('step')} in {where} is "
            f"inconsistent: {what}. {INTACT_FIX}"
        )

    step, stage = manifest.get("step"), manifest.get("stage")
    if not isinstance(step, int) or not isinstance(stage, int) or step < 0:
        raise bad(f"step {step!r} and stage {stage!r} must be integers")
    if step > schedule.total_steps:
        raise bad(f"step {step} is beyond the schedule's {schedule.total_steps} steps")
    if stage != schedule.stage_at(step):
        raise bad(
            f"it says step {step} is in stage {stage + 1}, but the schedule "
            f"{list(schedule.lengths)} puts it in stage {schedule.stage_at(step) + 1}"
        )
    growth = manifest.get("growth")
    if not isinstance(growth, list) or len(growth) != stage:
        raise bad(f"stage {stage + 1} needs {stage} growth events, the history has {growth!r}")
    depth = schedule.initial_depth
    for i, event in enumerate(growth):
        expected = {
            "step": schedule.starts[i + 1],
            "stage": i + 2,
            "op": repr(schedule.ops[i]),
            "depth_from": depth,
        }
        got = {k: event.get(k) if isinstance(event, dict) else None for k in expected}
        if got != expected or not isinstance(event.get("depth_to"), int):
            raise bad(f"growth event {i + 1} is {event!r}, expected {expected}")
        depth = event["depth_to"]
    if manifest.get("depth") != depth:
        raise bad(f"depth {manifest.get('depth')!r}, but its growth history ends at depth {depth}")
    tokens = (manifest.get("counters") or {}).get("tokens")
    if tokens != step * config.tokens_per_step:
        raise bad(
            f"{tokens!r} tokens counted, but {step} steps of {config.tokens_per_step} tokens "
            f"make {step * config.tokens_per_step}"
        )


def load_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    op: so.AbstractGrowth | Sequence[so.AbstractGrowth] | None = None,
    mesh: Mesh | None = None,
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """Load a trained model from a run directory: `(model, config, manifest)`.

    Read-only: it creates, cleans and deletes nothing, so it is safe on a live run (a step
    that the run removes while it is read raises [`CheckpointError`][]; read again). Every
    array is verified against the checksums recorded when it was saved.

    The model is rebuilt at the depth and stage the manifest records (a looped model with
    its weight tying), and its arrays are restored sharded over `mesh`.

    **Arguments:**

    - `run_dir`: the run directory given to `train`.
    - `step`: which checkpoint (default: the latest).
    - `op`: the operator(s), for runs made with `method="custom"`.
    - `mesh`: where to put the arrays (default: all devices).

    !!! Example

        ```python
        def final_model(run_dir):
            model, config, manifest = load_checkpoint(run_dir)   # the latest checkpoint
            assert model.depth == manifest["depth"]
            return model
        ```
    """
    directory = Path(run_dir) / CHECKPOINT_SUBDIR
    if not directory.is_dir():
        raise CheckpointError(
            f"{run_dir} has no {CHECKPOINT_SUBDIR}/ directory: nothing saved there."
        )
    # Read-only: a reader never cleans, deletes or creates anything, so it may read a live
    # run (whose in-flight saves are temporary directories a cleaning manager would remove).
    ckpt = Checkpointer(directory, read_only=True)
    try:
        manifest = ckpt.manifest(step)
        config = config_from_dict(manifest["config"])
        schedule = growth_schedule(config, op)
        check_manifest(
            manifest,
            config=config,
            schedule=schedule,
            data_info=None,
            where=str(run_dir),
            restoring_data=False,
        )
        optimizer, _ = make_optimizer(config)
        sk = skeleton(config, schedule, int(manifest["stage"]), mesh or make_mesh(), optimizer)
        if sk.depth != manifest["depth"]:
            raise CheckpointCorruptError(
                f"The checkpoint {ckpt.step_dir(manifest['step'])} records depth "
                f"{manifest['depth']}, but its stage {manifest['stage'] + 1} has "
                f"{sk.depth} blocks. {INTACT_FIX}"
            )
        params, _ = ckpt.restore(int(manifest["step"]), sk, opt_state=False, manifest=manifest)
    finally:
        ckpt.close()
    return sk.model(params), config, manifest


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to `path` via a temporary file and a rename (never a half-written file).

    !!! Example

        ```python
        import json, tempfile

        path = f"{tempfile.mkdtemp()}/config.json"
        write_json_atomic(path, {"depth": 8})
        assert json.load(open(path)) == {"depth": 8}
        ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
