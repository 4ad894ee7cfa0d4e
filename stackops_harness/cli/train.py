"""Train the reference LM under a growth method (MIDAS, GradStack, ...) or the baseline.

    python experiments/train.py --preset smoke --method midas --out runs/smoke-midas
    python experiments/train.py --preset cpu --method gradstack --out runs/g --set alpha=2
    python experiments/train.py --out runs/smoke-midas            # resume (config from the run)
    python experiments/train.py --out runs/smoke-midas --resume-from-intact   # past a corrupt step
    python experiments/train.py --preset smoke --out runs/x --devices 8   # 8 simulated CPUs

Every field of the config is also a flag (`--total-steps 200`, `--preserve true`), and
`--set key=value` (or `--set section.key=value`) does the same; `--help` lists them by
section. A run directory that holds checkpoints is resumed; its config must match (fields
that only change logging, saving or execution may differ). Several
processes: pass `--coordinator host:port --num-processes N --process-id i` to each (see
docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
from pathlib import Path

# Only the standard library is imported before the arguments are read: `--devices` must
# set XLA_FLAGS before JAX starts.
from stackops_harness import config as config_lib
from stackops_harness import require_extras


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: run options plus one flag per `TrainConfig` field.

    !!! Example

        ```python
        args = build_parser().parse_args(["--preset", "smoke", "--out", "runs/x", "--depth", "8"])
        assert args.depth == "8"
        ```
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="run directory")
    run.add_argument(
        "--preset",
        choices=sorted(config_lib.PRESETS),
        default=None,
        help="starting config (default: the run directory's config.json if it exists, else cpu)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, by its name (depth=8) or as section.field (model.depth=8)",
    )
    run.add_argument("--stop-after", type=int, default=None, help="stop (and save) after N steps")
    run.add_argument("--no-resume", action="store_true", help="refuse a directory with checkpoints")
    run.add_argument(
        "--resume-from-intact",
        action="store_true",
        help="if the latest checkpoint is corrupt, resume from the newest intact one (newer "
        "steps are moved to corrupt-checkpoints/, not deleted)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--print-config", action="store_true", help="print the config and exit")
    dist = parser.add_argument_group("devices and processes")
    dist.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
    dist.add_argument("--coordinator", default=None, help="host:port of process 0, or 'auto'")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f, tp in config_lib.config_fields():
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"config: {section} (TrainConfig.{section}; override the preset)"
            )
        groups[section].add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_metavar(tp),
            help=_field_help(f, tp),
        )
    return parser


def _metavar(tp: typing.Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(args) + "}"
    if args:  # optional
        return f"{_metavar(args[0])}|none"
    return getattr(tp, "__name__", "VALUE").upper()


def _field_help(f: dataclasses.Field, tp: typing.Any) -> str:
    """The field's help line from its metadata, with its default and whether it may change
    on resume (`%` doubled: argparse formats help strings)."""
    notes = [f"default {f.default!r}"]
    if f.metadata["resumable"]:
        notes.append("may change on resume")
    return f"{f.metadata['help']} ({'; '.join(notes)})".replace("%", "%%")


def resolve_config(args: argparse.Namespace) -> config_lib.TrainConfig:
    """The config of a command line: preset (or the run's saved config), then overrides.

    !!! Example

        ```python
        argv = ["--preset", "smoke", "--out", "r", "--method", "baseline"]
        assert resolve_config(build_parser().parse_args(argv)).method == "baseline"
        ```
    """
    saved = args.out / "config.json"
    if args.preset is None:
        if not saved.is_file():
            what = "holds a run but no config.json" if _has_run(args.out) else "has no run yet"
            raise ValueError(
                f"--out {args.out} {what}, so there is no config to resume with; pass --preset "
                f"(one of {', '.join(sorted(config_lib.PRESETS))}) with the run's overrides "
                "(a resume checks them against its checkpoint)."
            )
        try:
            base = config_lib.config_from_dict(json.loads(saved.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--out {args.out}: its config.json is not valid JSON ({e}); pass --preset "
                "with the run's overrides instead."
            ) from e
    else:
        base = config_lib.preset(args.preset)
    overrides = list(args.set)
    for _, f, _ in config_lib.config_fields():
        value = getattr(args, f.name)
        if value is not None:
            overrides.append(f"{f.name}={value}")
    if args.no_progress:
        overrides.append("progress=false")
    config = config_lib.apply_overrides(base, overrides)
    # Method names are checked against the registry where methods are resolved (this
    # imports stackops, hence JAX: after --devices has set XLA's flags).
    from stackops_harness.methods import check_method_name

    check_method_name(config.method)
    return config


def _has_run(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def check_run_flags(args: argparse.Namespace) -> None:
    """Raise `ValueError` naming the flag and the fix for a bad run or process flag.

    !!! Example

        ```python
        args = build_parser().parse_args(["--out", "r", "--stop-after", "-1"])
        try:
            check_run_flags(args)
        except ValueError as e:
            assert "--stop-after" in str(e)
        ```
    """
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the run.")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(
            f"--stop-after must be a positive number of steps, got {args.stop_after}; leave it "
            "out to train to total_steps."
        )
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}.")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}.")
    coordinator = args.coordinator or os.environ.get("STACKOPS_COORDINATOR")
    if coordinator is None or coordinator == "auto":
        if args.num_processes is not None and args.num_processes > 1 and coordinator is None:
            raise ValueError(
                f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (the "
                "address of process 0, e.g. 127.0.0.1:12355) and --process-id in each process."
            )
        if args.process_id is not None and coordinator is None:
            raise ValueError(
                f"--process-id {args.process_id} needs --coordinator HOST:PORT and "
                "--num-processes N; leave it out for a one-process run."
            )
        return
    if args.num_processes is None and "STACKOPS_NUM_PROCESSES" not in os.environ:
        raise ValueError("--coordinator needs --num-processes N (and --process-id i).")
    if args.process_id is None and "STACKOPS_PROCESS_ID" not in os.environ:
        raise ValueError("--coordinator needs --process-id i (0 for the coordinator itself).")
    if args.process_id is not None and args.num_processes is not None:
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(
                f"--process-id must lie in 0..{args.num_processes - 1} for --num-processes "
                f"{args.num_processes}, got {args.process_id}."
            )
    if ":" not in coordinator:
        raise ValueError(f"--coordinator must be HOST:PORT or 'auto', got {coordinator!r}.")


def _quiet_closed_event_loops() -> None:
    # After a failed restore, orbax's background asyncio callbacks may fire on a loop that is
    # already closed; Python then prints "RuntimeError: Event loop is closed" with a
    # traceback at exit. It is noise after the real error, so only that one is dropped.
    previous = sys.unraisablehook

    def hook(unraisable: typing.Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _fail(message: str) -> int:
    # One line, no traceback: the messages name the flag or file and the fix.
    print(f"stackops-train: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status (2 for a refused run, with one
    line on stderr; `STACKOPS_DEBUG=1` re-raises instead, with the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_run_flags(args)
    except ValueError as e:
        return _fail(str(e))
    if args.devices is not None:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        config = resolve_config(args)
    except (ValueError, TypeError) as e:
        field = re.search(r"TrainConfig\.(\w+)", str(e))
        hint = f" (flag --{field.group(1).replace('_', '-')})" if field else ""
        return _fail(f"{e}{hint}")
    if args.print_config:
        print(config_lib.format_config(config))
        return 0

    _quiet_closed_event_loops()
    from stackops_harness.checkpoint import CheckpointError
    from stackops_harness.lock import RunLockedError
    from stackops_harness.sharding import initialize_distributed
    from stackops_harness.trainer import train

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:
        if os.environ.get("STACKOPS_DEBUG"):
            raise
        return _fail(f"starting the processes (--coordinator/--num-processes) failed: {e}")
    import jax

    try:
        result = train(
            config,
            args.out,
            stop_after=args.stop_after,
            resume=not args.no_resume,
            resume_from_intact=args.resume_from_intact,
        )
    except (
        ValueError,
        OSError,
        CheckpointError,
        RunLockedError,
        FloatingPointError,
    ) as e:
        if os.environ.get("STACKOPS_DEBUG"):
            raise
        return _fail(f"{e} (STACKOPS_DEBUG=1 shows the traceback)")
    if jax.process_index() == 0:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(
            f"done: step {result.step}, stage {result.stage + 1}, depth {result.depth}, "
            f"val_loss {val}; metrics in {result.metrics_path}"
        )
    return 0


def entry() -> int:
    """Console script `stackops-train` (also `python experiments/train.py`).

    Runs `main` on the command line's arguments and returns the exit status."""
    require_extras("stackops-train")
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
