"""Checkpoints: SIGKILL at random moments loses nothing, and a wrong or corrupt checkpoint
is refused with an error that says what differs."""

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from harness_support import (
    ROOT,
    TRAIN_CMD,
    other_device_count,
    params_of,
    reference_run,
    run_cli,
    smoke,
    smoke_cli_args,
    subprocess_env,
    subprocess_reference,
    train_losses,
    val_losses,
)

from stackops_harness.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
)
from stackops_harness.trainer import train


def test_sigkill_at_random_moments_then_resume_gives_the_same_run(tmp_path):
    """A real training process is killed (SIGKILL) at seeded random moments, in whatever it
    is doing (compiling, stepping, growing, saving), then resumed until it finishes: losses
    and final parameters equal an uninterrupted run's bit for bit."""
    reference = subprocess_reference()  # same device count, same compiled programs
    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    cmd = [
        *TRAIN_CMD,
        *smoke_cli_args(out),
        "--devices",
        str(other_device_count()),
    ]
    rng = random.Random(1129)
    # Kill points spread over the run, counted in lines of metrics.jsonl (each line is an
    # event: a step, an evaluation, a growth, a checkpoint, a compilation; a full run writes
    # 61), so the moments are random whatever the machine's speed. Two of the kills wait
    # for a moment of their kind: right after a "checkpoint" line (the asynchronous save is
    # being written) and right after the last step of a stage (the model is being grown).
    boundaries = {4, 12, 24}  # Prop-1 over 40 steps and 4 stages: (4, 8, 12, 16)
    plan = [
        (rng.randint(8, 22), "grow"),
        (rng.randint(23, 40), "checkpoint"),
        (rng.randint(41, 50), None),
        (rng.randint(51, 59), None),
    ]
    kills, killed_during = 0, []
    for point, moment in plan:
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        proc = subprocess.Popen(
            cmd,
            env=subprocess_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        target = None
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            lines = _complete_lines(metrics)
            if target is None and metrics.exists() and metrics.stat().st_mtime_ns != before:
                if lines and json.loads(lines[-1])["kind"] in ("start", "resume"):
                    # Resumed past this point already: kill a few events later instead.
                    target = max(point, len(lines) + rng.randint(1, 4))
            if target is not None and len(lines) >= target:
                last = json.loads(lines[-1])
                if moment is None or (
                    last["kind"] == "checkpoint"
                    if moment == "checkpoint"
                    else last["kind"] == "train" and last["step"] in boundaries
                ):
                    break
            time.sleep(0.002)
        if moment is None:
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            killed_during.append(moment)
        proc.wait()
    assert kills >= 3 and {"checkpoint", "grow"} <= set(killed_during)
    run_cli(smoke_cli_args(out), devices=other_device_count())

    assert train_losses(metrics) == train_losses(reference / "metrics.jsonl")
    assert val_losses(metrics) == val_losses(reference / "metrics.jsonl")
    model, _, manifest = load_checkpoint(out)
    ref_model, _, _ = load_checkpoint(reference)
    assert manifest["step"] == 40
    for a, b in zip(params_of(model), params_of(ref_model)):
        np.testing.assert_array_equal(a, b)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers


def _complete_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line]


def _copy_reference(tmp_path) -> Path:
    result, _ = reference_run()
    dst = tmp_path / "copy"
    shutil.copytree(result.run_dir, dst)
    return dst


def test_an_interrupted_save_is_invisible_and_cleaned_up(tmp_path):
    run_dir = _copy_reference(tmp_path)
    ckpts = run_dir / "checkpoints"
    # What a process killed mid-save leaves: a temporary step directory, partly written.
    partial = ckpts / "50.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "40", partial)
    shutil.rmtree(partial / "params")
    ckpt = Checkpointer(ckpts)
    assert ckpt.latest_step() == 40 and ckpt.steps() == [30, 40]
    ckpt.close()
    assert not partial.exists()


def test_resuming_with_another_config_names_the_fields_that_differ(tmp_path):
    run_dir = _copy_reference(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)d_model: checkpoint 32, now 64.*lr"):
        train(smoke(d_model=64, n_heads=2, lr=1e-3), run_dir)
    with pytest.raises(
        CheckpointMismatchError, match="method: checkpoint 'midas', now 'gradstack'"
    ):
        train(smoke(method="gradstack"), run_dir)
    # Fields that only change logging or saving may differ.
    train(smoke(log_every=5, eval_every=20), run_dir, stop_after=40)


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays(tmp_path):
    run_dir = _copy_reference(tmp_path)
    # A manifest that claims another width than the arrays have (a checkpoint of another
    # model under this config): the arrays are checked before anything is restored.
    for step in (30, 40):
        meta = run_dir / "checkpoints" / str(step) / "meta" / "metadata"
        manifest = json.loads(meta.read_text())
        manifest["config"]["d_model"] = 64
        meta.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match=r"embed: saved \(256, 32\).*\(256, 64\)"):
        train(smoke(d_model=64), run_dir)


def test_a_corrupt_checkpoint_raises_a_clear_error(tmp_path):
    run_dir = _copy_reference(tmp_path)
    (run_dir / "checkpoints" / "40" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="no readable manifest.*delete"):
        train(smoke(), run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "40")
    for f in (run_dir / "checkpoints" / "30" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_checkpoint(run_dir)
