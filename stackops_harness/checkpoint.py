"""Checkpoints with orbax: params, optimizer state, data-iterator state and a JSON manifest.

A checkpoint is one step directory under `run_dir/checkpoints/` holding four items:
`params` and `opt_state` (orbax `StandardSave`, sharded arrays), `data` (the grain
iterator's state, one file per process) and `meta` (the manifest: config, step, stage,
depth, growth history, counters). orbax writes a step into a temporary directory and
renames it when every item is complete, so a process killed at any moment, even during a
save, leaves only complete checkpoints visible; leftovers are removed when the run reopens.

Restoring never guesses: the manifest is read first, the model's skeleton at the saved
stage is rebuilt from the config and the growth history it records, the saved arrays'
names and shapes are checked against that skeleton, and only then are they loaded, each
straight into its sharding. Anything that does not match raises
[`CheckpointMismatchError`][] naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

import stackops as so

from .config import TrainConfig, config_diff, config_from_dict
from .methods import GrowthSchedule, growth_schedule
from .sharding import make_mesh
from .state import Skeleton, make_optimizer, skeleton

__all__ = [
    "MANIFEST_FORMAT",
    "CheckpointError",
    "CheckpointMismatchError",
    "Checkpointer",
    "check_manifest",
    "load_checkpoint",
    "make_manifest",
    "write_json_atomic",
]

MANIFEST_FORMAT = "stackops-train-checkpoint/1"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: missing, incomplete or corrupt."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this run: another config, model, data or method."""


class Checkpointer:
    """Saves and restores training checkpoints in `directory` with an orbax CheckpointManager.

    **Arguments:**

    - `directory`: where step directories go (`run_dir / "checkpoints"`).
    - `keep`: how many of the latest checkpoints to keep.
    - `async_save`: write in a background thread (arrays are copied to host memory before
      `save` returns, so training may go on and even donate the buffers).

    !!! Example

        ```python
        def save_and_restore(run_dir, step, params, opt_state, data_iter, manifest, sk):
            ckpt = Checkpointer(f"{run_dir}/checkpoints", keep=3)
            ckpt.save(step, params, opt_state, data_iter, manifest)
            ckpt.wait()
            restored = ckpt.restore(step, sk, data_iter)   # (params, opt_state)
            ckpt.close()
            return restored
        ```
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = 3, async_save: bool = True
    ):
        self.directory = Path(directory).absolute()
        if jax.process_index() == 0 and self.directory.is_dir():
            # A save cut short by a crash leaves `<step>.orbax-checkpoint-tmp*`: never a
            # checkpoint, so remove it now (orbax would too, but in the background).
            for leftover in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or `None`."""
        return self.manager.latest_step()

    def save(
        self, step: int, params: Any, opt_state: Any, data_iter: Any, manifest: Mapping[str, Any]
    ) -> None:
        """Start saving a checkpoint at `step` (returns once the arrays are on the host)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(dict(manifest)),
        )
        self.manager.save(step, args=args, force=True)

    def manifest(self, step: int | None = None) -> dict[str, Any]:
        """The manifest of the checkpoint at `step` (default: the latest)."""
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            manifest = out["meta"]
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.directory} has no readable manifest "
                f"({type(e).__name__}: {e}). It is corrupt or was not written by this harness; "
                f"delete {self.directory / str(step)} to resume from the previous checkpoint."
            ) from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.directory} has a manifest of format "
                f"{found!r}, not {MANIFEST_FORMAT!r}: it was not written by this harness."
            )
        return manifest

    def restore(
        self, step: int, sk: Skeleton, data_iter: Any = None, *, opt_state: bool = True
    ) -> tuple[Any, Any]:
        """Load params (and optimizer and data-iterator state) into the skeleton `sk`.

        The saved arrays' names and shapes are compared with the skeleton's first, so a
        checkpoint of another model raises [`CheckpointMismatchError`][] naming the arrays
        that differ instead of restoring part of it. `data_iter` is restored in place.

        **Returns:** `(params, opt_state)`; `opt_state` is `None` with `opt_state=False`.
        """
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
            raise CheckpointError(
                f"Restoring the checkpoint at step {step} in {self.directory} failed "
                f"({type(e).__name__}: {e}). It is corrupt or incomplete; delete "
                f"{self.directory / str(step)} to resume from the previous checkpoint."
            ) from e
        return out["params"], (out["opt_state"] if opt_state else None)

    def wait(self) -> None:
        """Block until every pending save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

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
        try:
            meta = self.manager.item_metadata(step)[item]
        except Exception as e:  # noqa: BLE001 -- re-raised with context
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.directory} has no readable {item!r} "
                f"({type(e).__name__}: {e}): it is corrupt or incomplete."
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
                f"The {item!r} saved at step {step} in {self.directory} do not match the model "
                f"rebuilt from its manifest ({len(problems)} arrays differ):\n  {shown}"
            )


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
    diff = config_diff(manifest["config"], config)
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
    expected_stage = schedule.stage_at(int(manifest["step"]))
    if stage != expected_stage:
        raise CheckpointError(
            f"The checkpoint in {where} says step {manifest['step']} is in stage {stage + 1}, "
            f"but the schedule {list(schedule.lengths)} puts it in stage {expected_stage + 1}: "
            "the manifest is corrupt."
        )
    if data_info is not None and manifest.get("data") and dict(manifest["data"]) != dict(data_info):
        raise CheckpointMismatchError(
            f"The checkpoint in {where} was trained on other token files: saved "
            f"{dict(manifest['data'])}, now {dict(data_info)}. Point data_dir at the original "
            "data."
        )
    if restoring_data and int(manifest.get("process_count", 1)) != jax.process_count():
        raise CheckpointMismatchError(
            f"The checkpoint in {where} was saved by {manifest['process_count']} processes, and "
            f"each saved its own data-iterator state; resume it with "
            f"{manifest['process_count']} processes, not {jax.process_count()}."
        )


def load_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    op: so.AbstractGrowth | Sequence[so.AbstractGrowth] | None = None,
    mesh: Mesh | None = None,
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """Load a trained model from a run directory: `(model, config, manifest)`.

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
    ckpt = Checkpointer(directory, keep=1_000_000, async_save=False)
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
        params, _ = ckpt.restore(int(manifest["step"]), sk, opt_state=False)
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
