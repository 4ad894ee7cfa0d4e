"""The same run on another number of devices, and on two processes, gives the same losses."""

import subprocess
import time
from pathlib import Path

import numpy as np
from harness_support import (
    ROOT,
    TRAIN_CMD,
    free_port,
    one_line_error,
    reference_run,
    run_cli,
    smoke_cli_args,
    subprocess_env,
    subprocess_reference,
    train_losses,
    val_losses,
)

from stackops_harness.checkpoint import Checkpointer
from stackops_harness.metrics import read_metrics


def _assert_same_losses(a: Path, b: Path, steps: int = 40) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la)[:steps] == list(range(1, steps + 1)) and len(lb) == steps
    np.testing.assert_allclose([la[k] for k in sorted(lb)], [lb[k] for k in sorted(lb)], rtol=2e-5)
    va, vb = val_losses(a), val_losses(b)
    assert set(vb) <= set(va) and vb
    np.testing.assert_allclose([va[k] for k in sorted(vb)], [vb[k] for k in sorted(vb)], rtol=2e-5)


def test_one_device_and_eight_devices_give_the_same_losses():
    """This process runs on 8 simulated devices (or 1); the subprocess on the other count."""
    result, _ = reference_run()
    other = subprocess_reference()
    devices = {r["devices"] for r in read_metrics(other / "metrics.jsonl", "start")}
    assert devices != {read_metrics(result.metrics_path, "start")[0]["devices"]}
    _assert_same_losses(result.metrics_path, other / "metrics.jsonl")


def _two_processes(out: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for i in range(2):
        cmd = [
            *TRAIN_CMD,
            *smoke_cli_args(out, *extra),
            "--devices",
            "1",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env=subprocess_env(),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen]) -> None:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


def test_two_processes_give_the_same_losses_as_one(tmp_path):
    """jax.distributed over loopback (gloo): two processes, each with its grain shard of
    every global batch, train exactly the one-process run (through a stage boundary and
    two checkpoints; stopped at step 12 to keep the test short). A two-process run killed
    (SIGKILL, both processes) after a checkpoint and resumed by two processes equals the
    uninterrupted one bit for bit; resuming it with one process is refused, clearly."""
    result, _ = reference_run()
    out = tmp_path / "two-procs"
    _finish(_two_processes(out, "--stop-after", "12"))
    start = read_metrics(out / "metrics.jsonl", "start")[0]
    assert (start["processes"], start["devices"]) == (2, 2)
    _assert_same_losses(result.metrics_path, out / "metrics.jsonl", steps=12)
    assert sorted(val_losses(out / "metrics.jsonl")) == [0, 10]
    # Each process saved its own data-iterator state in every checkpoint.
    names = sorted(p.name for p in (out / "checkpoints" / "12" / "data").iterdir())
    assert "process_0-of-2.json" in names and "process_1-of-2.json" in names

    killed = tmp_path / "killed"
    procs = _two_processes(killed, "--stop-after", "12")
    metrics = killed / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            records = read_metrics(metrics) if metrics.exists() else []
            if any(r["kind"] == "train" and r["step"] == 7 for r in records):
                break  # past the step-4 checkpoint, in the middle of stage 2
            time.sleep(0.01)
        assert all(p.poll() is None for p in procs), "the run ended before it was killed"
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    reader = Checkpointer(killed / "checkpoints", read_only=True)
    newest = reader.latest_step()
    reader.close()
    assert newest == 4
    _finish(_two_processes(killed, "--stop-after", "12"))
    resumes = read_metrics(metrics, "resume")
    assert [r["step"] for r in resumes] == [newest]
    assert [r["step"] for r in read_metrics(metrics, "train")] == list(range(1, 13))
    assert train_losses(metrics) == train_losses(out / "metrics.jsonl")
    assert val_losses(metrics) == val_losses(out / "metrics.jsonl")

    one = run_cli(smoke_cli_args(killed, "--stop-after", "14"), devices=2, check=False)
    assert one.returncode == 2
    line = one_line_error(one.stderr)
    assert "saved by 2 processes" in line and "resume it with 2 processes" in line
