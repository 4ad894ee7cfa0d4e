"""One writer per run directory, failures reported before or as they happen, and command-line
refusals that are one line naming the flag and the fix."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from harness_support import ROOT, reference_run, smoke, smoke_cli_args, subprocess_env

from stackops_harness.checkpoint import CheckpointError
from stackops_harness.cli import train as train_cli
from stackops_harness.lock import RunLock, RunLockedError, lock_holder
from stackops_harness.trainer import Trainer, train

_HOLD = (
    "import sys, time; from stackops_harness.lock import RunLock; "
    "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"
)


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir)],
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
    tmp_path,
):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on host .* since .*another"):
            RunLock(run_dir).acquire()
        # The trainer refuses at once, before loading data or touching checkpoints.
        start = time.perf_counter()
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            train(smoke(), run_dir)
        assert time.perf_counter() - start < 5
        assert not (run_dir / "checkpoints").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The holder was killed: its lock file is still there, but stale, and taken over.
    assert lock_holder(run_dir)["pid"] == proc.pid
    with RunLock(run_dir) as lock:
        assert lock.previous["pid"] == proc.pid
        assert lock_holder(run_dir)["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run_dir).acquire()  # in the same process, too
    RunLock(run_dir).acquire().release()


def test_the_trainer_locks_the_run_directory_only_while_it_is_open(tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(smoke(total_steps=8, ckpt_every=0), run_dir)
    assert not run_dir.exists() and trainer.lock is None  # no I/O on construction
    with trainer:
        assert lock_holder(run_dir)["pid"] == os.getpid()
        # A second writer on the same directory is refused while this one is open.
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            Trainer(smoke(total_steps=8, ckpt_every=0), run_dir).run()
        result = trainer.run(stop_after=4)
        assert result.step == 4 and trainer.lock is not None
    RunLock(run_dir).acquire().release()  # released on exit
    # run() on a trainer that is not open opens and closes by itself, also on an error.
    failing = Trainer(smoke(total_steps=8, ckpt_every=0), run_dir, on_eval=_raise)
    with pytest.raises(RuntimeError, match="hook failed"):
        failing.run()
    assert failing.lock is None
    RunLock(run_dir).acquire().release()
    assert Trainer(smoke(total_steps=8, ckpt_every=0), run_dir).run().step == 8


def _raise(step, model, record):
    raise RuntimeError("hook failed")


def test_racing_for_a_stale_lock_lets_exactly_one_writer_win(tmp_path):
    run_dir = tmp_path / "run"
    dead = _holder(run_dir)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    procs = [_try_lock(run_dir) for _ in range(4)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["locked", "refused", "refused", "refused"], results


def _try_lock(run_dir) -> subprocess.Popen:
    code = (
        "import sys, time; from stackops_harness.lock import RunLock, RunLockedError\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True)\n"
        "    time.sleep(3)\n"
        "except RunLockedError:\n    print('refused', flush=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir), str(time.time() + 1.5)],
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_an_unusable_run_directory_is_refused_before_training(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        train(smoke(), a_file)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    start = time.perf_counter()
    with pytest.raises(NotADirectoryError, match="checkpoints is a file"):
        train(smoke(), run_dir)
    assert time.perf_counter() - start < 5


def test_a_failing_save_stops_the_run_within_seconds(tmp_path):
    """The checkpoint directory stops being usable mid-run (replaced by a file: a failure
    even root cannot write through): the next save raises at once, naming the directory,
    instead of hanging in a background wait."""
    reference_run()  # compiled steps shared
    run_dir = tmp_path / "run"
    broken_at = {}

    def sabotage(step, model, record):
        if step == 10:
            ckpts = run_dir / "checkpoints"
            shutil.move(str(ckpts), str(run_dir / "moved"))
            ckpts.write_text("")
            broken_at["t"] = time.perf_counter()

    failed = r"(?s)checkpoint.* in .*checkpoints.* failed.*writable"
    with pytest.raises(CheckpointError, match=failed):
        train(smoke(), run_dir, on_eval=sabotage, stop_after=12)
    seconds = time.perf_counter() - broken_at["t"]
    print(f"failed save reported after {seconds:.3f} s")
    assert seconds < 10
    RunLock(run_dir).acquire().release()  # and the run released its lock


def _cli(argv, capsys) -> str:
    code = train_cli.main(argv)
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--stop-after", "-1"], "--stop-after"),
        (["--stop-after", "0"], "--stop-after"),
        (["--process-id", "1"], "--coordinator"),
        (["--num-processes", "2"], "--coordinator"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id"),
        (["--coordinator", "127.0.0.1:1"], "--num-processes"),
        (["--devices", "0"], "--devices"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys, extra, flag):
    line = _cli(smoke_cli_args(tmp_path / "r", *extra), capsys)
    assert flag in line and line.startswith("stackops-train: error:")
    assert not (tmp_path / "r").exists()  # nothing was started


def test_out_pointing_at_a_file_and_a_missing_config_are_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out" in _cli(smoke_cli_args(a_file), capsys)
    # A second writer on the command line: refused in one line naming the holder.
    holder = _holder(tmp_path / "held")
    try:
        line = _cli(smoke_cli_args(tmp_path / "held"), capsys)
        assert f"pid {holder.pid}" in line and "another --out" in line
    finally:
        holder.kill()
        holder.wait()
    # Without --preset, only a run with its config.json can be resumed; never a fresh run.
    result, _ = reference_run()
    run_dir = tmp_path / "no-config"
    shutil.copytree(result.run_dir, run_dir, ignore=shutil.ignore_patterns("lock"))
    (run_dir / "config.json").unlink()
    line = _cli(["--out", str(run_dir), "--no-progress"], capsys)
    assert "no config.json" in line and "--preset" in line
    line = _cli(["--out", str(tmp_path / "new"), "--no-progress"], capsys)
    assert "--preset" in line
    assert not (tmp_path / "new").exists()
    # With the config given, the run resumes (and config.json is written back).
    assert train_cli.main(smoke_cli_args(run_dir, "--set", "keep_checkpoints=7")) == 0
    assert (run_dir / "config.json").is_file()


def test_a_save_failing_in_the_background_is_reported_within_seconds(tmp_path):
    """The checkpoint directory vanishes while an asynchronous save is being written: orbax's
    background thread fails (and its own finalisation swallows the error), yet the next
    `check()` (the trainer calls it after every step) raises within seconds."""
    import glob

    import jax.numpy as jnp
    import numpy as np

    from stackops_harness import data
    from stackops_harness.checkpoint import Checkpointer

    it = data.make_train_iter(np.arange(1000), seq_len=8, global_batch=4, seed=0)
    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts)
    big = {"w": jnp.ones((1024, 1024))}
    ckpt.save(1, big, {"m": jnp.zeros((1024, 1024))}, it, {"format": "test"})
    start = time.perf_counter()
    for partial in glob.glob(f"{ckpts}/*tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.write_text("")
    with pytest.raises(CheckpointError, match=r"(?s)background.*save.*failed"):
        while time.perf_counter() - start < 30:
            ckpt.check()
            time.sleep(0.01)
    seconds = time.perf_counter() - start
    print(f"background save failure reported after {seconds:.3f} s")
    assert seconds < 10
    try:
        ckpt.close()
    except CheckpointError:
        pass
