"""The same run on another number of devices, and on two processes, gives the same losses."""

import subprocess
from pathlib import Path

import numpy as np
from harness_support import (
    ROOT,
    TRAIN_CMD,
    free_port,
    reference_run,
    smoke_cli_args,
    subprocess_env,
    subprocess_reference,
    train_losses,
    val_losses,
)

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


def test_two_processes_give_the_same_losses_as_one(tmp_path):
    """jax.distributed over loopback (gloo): two processes, each with its grain shard of
    every global batch, train exactly the one-process run (through a stage boundary and
    two checkpoints; stopped at step 12 to keep the test short)."""
    result, _ = reference_run()
    out = tmp_path / "two-procs"
    port = free_port()
    procs = []
    for i in range(2):
        cmd = [
            *TRAIN_CMD,
            *smoke_cli_args(out, "--stop-after", "12"),
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
    start = read_metrics(out / "metrics.jsonl", "start")[0]
    assert (start["processes"], start["devices"]) == (2, 2)
    _assert_same_losses(result.metrics_path, out / "metrics.jsonl", steps=12)
    assert sorted(val_losses(out / "metrics.jsonl")) == [0, 10]
    # Each process saved its own data-iterator state in every checkpoint.
    names = sorted(p.name for p in (out / "checkpoints" / "12" / "data").iterdir())
    assert "process_0-of-2.json" in names and "process_1-of-2.json" in names
