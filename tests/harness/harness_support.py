"""Shared pieces of the training-harness tests: token files, the smoke config, one reference
run per test session, and a way to run `experiments/train.py` in a subprocess."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import numpy as np

from stackops_harness import data
from stackops_harness.config import preset
from stackops_harness.metrics import read_metrics
from stackops_harness.trainer import train

ROOT = Path(__file__).resolve().parents[2]
# The training command line, as an installed user runs it (`python experiments/train.py` is a
# thin wrapper around the same module).
TRAIN_CMD = [sys.executable, "-m", "stackops_harness.cli.train"]

_TMP = Path(tempfile.mkdtemp(prefix="stackops-harness-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.cache
def token_dir() -> Path:
    """Small train/val token files built from a few standard-library modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f"{name}.py" for name in ("argparse", "dataclasses", "fractions", "textwrap")]
    out = _TMP / "tokens"
    data.build_token_files(files, out, val_fraction=0.25, seed=0)
    return out


def compile_cache() -> str:
    """A persistent JAX compilation cache shared by this session's subprocesses."""
    path = _TMP / "jax-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def smoke(**overrides):
    """The smoke preset on the test token files, without a progress bar."""
    return preset("smoke", **{"data_dir": str(token_dir()), "progress": False, **overrides})


def params_of(model) -> list[np.ndarray]:
    """The model's arrays as host numpy arrays, in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(model))]


def train_losses(metrics_path) -> dict[int, float]:
    """`{step: loss of that step}` from a metrics file written with log_every=1."""
    return {r["step"]: r["loss_last"] for r in read_metrics(metrics_path, "train")}


def val_losses(metrics_path) -> dict[int, float]:
    """`{step: validation loss}`."""
    return {r["step"]: r["val_loss"] for r in read_metrics(metrics_path, "eval")}


# Every checkpoint of a smoke run: every ckpt_every=10 steps and at every stage boundary.
SMOKE_CHECKPOINTS = [4, 10, 12, 20, 24, 30, 40]


@functools.cache
def reference_run():
    """An uninterrupted smoke run (MIDAS, 4 stages, 40 steps) in this process, once; it keeps
    all its checkpoints (`SMOKE_CHECKPOINTS`)."""
    result = train(smoke(keep_checkpoints=len(SMOKE_CHECKPOINTS)), _TMP / "reference")
    return result, params_of(result.model)


def flip_bit(path: Path, rng) -> int:
    """Flip one random bit of the file at `path` in place; return the bit's index."""
    raw = bytearray(path.read_bytes())
    bit = rng.randrange(8 * len(raw))
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))
    return bit


def one_line_error(stderr: str) -> str:
    """The refusal a command line printed: exactly one non-empty line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and "absl" not in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
    return lines[0]


def run_cli(
    args: list[str], *, devices: int | None = None, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the training command line with `args` in a fresh Python process."""
    cmd = [*TRAIN_CMD, *args]
    if devices is not None:
        cmd += ["--devices", str(devices)]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: CPU only, no inherited device-count flag."""
    env = dict(os.environ)
    # No inherited device-count flag (the command line's --devices sets it), and XLA's
    # cheaper backend optimisation: these tests check the harness, not the kernels, and it
    # cuts compilation time by about a quarter.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("STACKOPS_DEBUG", None)
    return env


def smoke_cli_args(out: Path, *extra: str) -> list[str]:
    """Command-line arguments for a smoke run into `out` (shared compile cache)."""
    return [
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"data_dir={token_dir()}",
        "--set",
        f"compile_cache={compile_cache()}",
        *extra,
    ]


def other_device_count() -> int:
    """A device count unlike this process's: 1 when the tests run on several, else 8."""
    return 1 if jax.device_count() != 1 else 8


@functools.cache
def subprocess_reference() -> Path:
    """An uninterrupted smoke run by the command line in a fresh process with
    `other_device_count()` devices (it also fills the shared compilation cache)."""
    out = _TMP / f"cli-reference-{other_device_count()}"
    run_cli(smoke_cli_args(out), devices=other_device_count())
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
