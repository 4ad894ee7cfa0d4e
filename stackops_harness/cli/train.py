"""Train the reference LM under a growth method (MIDAS, GradStack, ...) or the baseline.

    python experiments/train.py --preset smoke --method midas --out runs/smoke-midas
    python experiments/train.py --preset cpu --method gradstack --out runs/g --set alpha=2
    python experiments/train.py --out runs/smoke-midas            # resume (config from the run)
    python experiments/train.py --preset smoke --out runs/x --devices 8   # 8 simulated CPUs

Every field of the config is also a flag (`--total-steps 200`, `--preserve true`), and
`--set key=value` does the same. A run directory that holds checkpoints is resumed; its
config must match (fields that only change logging or saving may differ). Several
processes: pass `--coordinator host:port --num-processes N --process-id i` to each (see
docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    run.add_argument("--stop-after", type=int, default=None, help="stop (and save) after N steps")
    run.add_argument("--no-resume", action="store_true", help="refuse a directory with checkpoints")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--print-config", action="store_true", help="print the config and exit")
    dist = parser.add_argument_group("devices and processes")
    dist.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
    dist.add_argument("--coordinator", default=None, help="host:port of process 0, or 'auto'")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    fields = parser.add_argument_group("config fields (override the preset)")
    for f in dataclasses.fields(config_lib.TrainConfig):
        tp = typing.get_type_hints(config_lib.TrainConfig)[f.name]
        fields.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=getattr(tp, "__name__", "VALUE").upper(),
            help=f"default {f.default!r}",
        )
    return parser


def resolve_config(args: argparse.Namespace) -> config_lib.TrainConfig:
    """The config of a command line: preset (or the run's saved config), then overrides.

    !!! Example

        ```python
        argv = ["--preset", "smoke", "--out", "r", "--method", "baseline"]
        assert resolve_config(build_parser().parse_args(argv)).method == "baseline"
        ```
    """
    saved = args.out / "config.json"
    if args.preset is None and saved.is_file():
        base = config_lib.config_from_dict(json.loads(saved.read_text()))
    else:
        base = config_lib.preset(args.preset or "cpu")
    overrides = list(args.set)
    for f in dataclasses.fields(config_lib.TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            overrides.append(f"{f.name}={value}")
    if args.no_progress:
        overrides.append("progress=false")
    return config_lib.apply_overrides(base, overrides)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.devices is not None:
        if args.devices < 1:
            parser.error(f"--devices must be >= 1, got {args.devices}")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        config = resolve_config(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.print_config:
        print(config_lib.format_config(config))
        return 0

    from stackops_harness.checkpoint import CheckpointError
    from stackops_harness.sharding import initialize_distributed
    from stackops_harness.trainer import train

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    try:
        result = train(config, args.out, stop_after=args.stop_after, resume=not args.no_resume)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        if os.environ.get("STACKOPS_DEBUG"):
            raise
        print(f"error: {e}\n(set STACKOPS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
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
