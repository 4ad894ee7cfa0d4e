"""Checkpoints: SIGKILL at random moments loses nothing, every flipped bit is refused or
harmless, a wrong or corrupt checkpoint is refused with an error that names the step
directory and the fix, and readers never disturb a live run."""

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
    SMOKE_CHECKPOINTS,
    TRAIN_CMD,
    flip_bit,
    one_line_error,
    other_device_count,
    params_of,
    reference_run,
    run_cli,
    smoke,
    smoke_cli_args,
    subprocess_env,
    subprocess_reference,
    token_dir,
    train_losses,
    val_losses,
)

from stackops_harness import data
from stackops_harness.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    _manifest_hash,
    check_manifest,
    load_checkpoint,
)
from stackops_harness.config import config_from_dict
from stackops_harness.methods import growth_schedule
from stackops_harness.metrics import read_metrics
from stackops_harness.sharding import make_mesh
from stackops_harness.state import make_optimizer, skeleton
from stackops_harness.trainer import train


def _latest_step(run_dir: Path) -> int | None:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    ckpt = Checkpointer(ckpts, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def test_sigkill_at_random_moments_then_resume_gives_the_same_run(tmp_path):
    """A real training process is killed (SIGKILL) at seeded random moments, in whatever it
    is doing (compiling, stepping, growing, saving), then relaunched until it finishes:
    every relaunch resumes from the newest checkpoint on disk, metrics.jsonl ends with every
    step exactly once, and losses and final parameters equal an uninterrupted run's bit for
    bit."""
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
        (rng.randint(10, 22), "grow"),
        (rng.randint(23, 40), "checkpoint"),
        (rng.randint(41, 50), None),
        (rng.randint(51, 59), None),
    ]
    kills, killed_during = 0, []
    launches: list[tuple[int, int | None]] = []  # (pid, newest checkpoint when launched)
    for point, moment in plan:
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        launches.append((0, _latest_step(out)))
        proc = subprocess.Popen(
            cmd,
            env=subprocess_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        launches[-1] = (proc.pid, launches[-1][1])
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
    launches.append((-1, _latest_step(out)))
    run_cli(smoke_cli_args(out), devices=other_device_count())

    # Every relaunch resumed from the newest checkpoint on disk when it started (the first
    # kill comes after the first checkpoint, so every relaunch had one to resume from).
    starts = read_metrics(metrics, "start") + read_metrics(metrics, "resume")
    by_pid = {r["pid"]: r for r in starts}
    assert launches[0][1] is None and by_pid[launches[0][0]]["kind"] == "start"
    for pid, newest in launches[1:]:
        assert newest is not None
        record = by_pid[pid] if pid > 0 else read_metrics(metrics, "resume")[-1]
        assert (record["kind"], record["step"]) == ("resume", newest)
    # metrics.jsonl was cut back at each resume: every step is there exactly once.
    steps = [r["step"] for r in read_metrics(metrics, "train")]
    assert steps == list(range(1, 41))

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


def _copy_reference(tmp_path, steps=(30, 40)) -> Path:
    result, _ = reference_run()
    dst = tmp_path / "copy"
    shutil.copytree(result.run_dir, dst, ignore=shutil.ignore_patterns("lock"))
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) not in steps:
            shutil.rmtree(p)
    return dst


def test_an_interrupted_save_is_invisible_and_only_the_writer_cleans_it(tmp_path):
    run_dir = _copy_reference(tmp_path)
    ckpts = run_dir / "checkpoints"
    # What a process killed mid-save (or a live run saving now) leaves: a temporary step
    # directory, partly written.
    partial = ckpts / "50.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "40", partial)
    shutil.rmtree(partial / "params")
    reader = Checkpointer(ckpts, read_only=True)
    assert reader.latest_step() == 40 and reader.steps() == [30, 40]
    reader.close()
    load_checkpoint(run_dir)
    assert partial.exists()  # readers delete nothing
    writer = Checkpointer(ckpts)
    assert writer.steps() == [30, 40]
    writer.close()
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


def _rewrite_manifest(step_dir: Path, edit) -> None:
    """Edit a checkpoint's manifest and sign it again, as a (buggy) writer would have."""
    meta = step_dir / "meta" / "metadata"
    manifest = json.loads(meta.read_text())
    edit(manifest)
    manifest["manifest_sha256"] = _manifest_hash(manifest)
    meta.write_text(json.dumps(manifest))


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays(tmp_path):
    run_dir = _copy_reference(tmp_path)
    # A manifest that claims another width than the arrays have (a checkpoint of another
    # model under this config): the arrays are checked before anything is restored.
    for step in (30, 40):
        _rewrite_manifest(
            run_dir / "checkpoints" / str(step), lambda m: m["config"]["model"].update(d_model=64)
        )
    with pytest.raises(CheckpointMismatchError, match=r"embed: saved \(256, 32\).*\(256, 64\)"):
        train(smoke(d_model=64), run_dir)


# The config.json of a smoke run as the harness wrote it before the config had sections
# (format 1: one key per field, no "format" key), as written into config.json and into
# every checkpoint's manifest.
_FLAT_SMOKE_CONFIG = {
    "alpha": 1.0, "async_checkpoints": True, "attention": "auto", "b1": 0.9, "b2": 0.95,
    "ckpt_every": 10, "compile_cache": "", "compute_dtype": "float32", "d_ff": None,
    "d_model": 32, "data_dir": "", "data_seed": 0, "depth": 4, "eval_batch": None,
    "eval_batches": 2, "eval_every": 10, "fsdp_min_size": 16384, "global_batch": 8,
    "grad_clip": 1.0, "interp_t": 0.5, "keep_checkpoints": 2, "log_every": 1, "lr": 0.003,
    "method": "midas", "min_lr_ratio": 0.1, "n_heads": 2, "norm": "rms", "opt_policy": "copy",
    "pos": "rope", "preserve": False, "progress": False, "seed": 0, "seq_len": 32, "stages": 4,
    "total_steps": 40, "unroll": 0, "vocab_size": 256, "warmup_steps": 4, "weight_decay": 0.1,
}


def test_a_run_saved_in_the_flat_config_format_resumes_bit_for_bit(tmp_path):
    result, final = reference_run()
    run_dir = _copy_reference(tmp_path, steps=(20,))
    flat = dict(_FLAT_SMOKE_CONFIG, data_dir=str(token_dir()))
    (run_dir / "config.json").write_text(json.dumps({**flat, "provenance": {"git": None}}))
    _rewrite_manifest(run_dir / "checkpoints" / "20", lambda m: m.update(config=flat))
    # As `stackops-train --out RUN` does: the config from config.json, then resume.
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    assert config == result.config.replace(keep_checkpoints=2)
    resumed = train(config, run_dir)
    assert resumed.step == 40 and val_losses(resumed.metrics_path) == val_losses(
        result.metrics_path
    )
    for a, b in zip(params_of(resumed.model), final, strict=True):
        np.testing.assert_array_equal(a, b)
    # A flat manifest of another config is still refused, naming the field.
    other = dict(flat, lr=1e-3)
    step_dir = run_dir / "checkpoints" / "40"
    _rewrite_manifest(step_dir, lambda m: m.update(config=other))
    with pytest.raises(CheckpointMismatchError, match=r"lr: checkpoint 0.001, now 0.003"):
        train(config, run_dir)


def test_edited_manifests_are_refused_naming_the_step_and_the_fix(tmp_path):
    result, _ = reference_run()
    cfg = result.config
    sched = growth_schedule(cfg)
    step_dir = result.run_dir / "checkpoints" / "30"
    manifest = json.loads((step_dir / "meta" / "metadata").read_text())
    check_manifest(manifest, config=cfg, schedule=sched, data_info=None, where="run")

    def edited(**changes):
        m = json.loads(json.dumps(manifest)) | changes
        m["manifest_sha256"] = _manifest_hash(m)
        return m

    growth = manifest["growth"]
    wrong = [
        (edited(stage=2), "stage 3"),
        (edited(depth=3), "depth 3"),
        (edited(growth=growth[:2]), "growth events"),
        (edited(growth=[growth[0], {**growth[1], "depth_to": 5}, growth[2]]), "growth event"),
        (edited(growth=[{**growth[0], "step": 5}, *growth[1:]]), "growth event 1"),
        (edited(counters={**manifest["counters"], "tokens": 1}), "tokens"),
    ]
    for bad, what in wrong:
        with pytest.raises(CheckpointCorruptError, match=rf"(?s){what}.*--resume-from-intact"):
            check_manifest(bad, config=cfg, schedule=sched, data_info=None, where="run")

    # An edit without re-signing is caught by the manifest's own hash.
    run_dir = _copy_reference(tmp_path)
    meta = run_dir / "checkpoints" / "40" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"stage": 3', '"stage": 2'))
    with pytest.raises(CheckpointCorruptError, match=r"(?s)checkpoints/40.*SHA-256.*intact"):
        load_checkpoint(run_dir)


def _full_restore(run_dir: Path, step: int):
    """Everything a resume loads from `step`, verified: (params, opt_state, data state)."""
    result, _ = reference_run()
    cfg = result.config
    sched = growth_schedule(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        manifest = ckpt.manifest(step)
        check_manifest(manifest, config=cfg, schedule=sched, data_info=None, where=str(run_dir))
        optimizer, _ = make_optimizer(cfg)
        sk = skeleton(cfg, sched, int(manifest["stage"]), make_mesh(), optimizer)
        it = data.make_train_iter(
            data.load_tokens(token_dir() / "train.bin"),
            seq_len=cfg.seq_len,
            global_batch=cfg.global_batch,
            seed=cfg.data_seed,
        )
        params, opt_state = ckpt.restore(step, sk, it, manifest=manifest)
        return params_of(params), params_of(opt_state), it.get_state()
    finally:
        ckpt.close()


def test_one_flipped_bit_in_any_checkpoint_file_is_refused_or_harmless(tmp_path):
    """One seeded random bit flipped in each file of a checkpoint, one file at a time:
    restoring either refuses with a CheckpointError/CheckpointMismatchError or returns
    exactly the saved arrays and data state; nothing loads wrong values."""
    source = _copy_reference(tmp_path, steps=(24,))
    original = _full_restore(source, 24)
    files = sorted(p for p in (source / "checkpoints" / "24").rglob("*") if p.is_file())
    assert len(files) >= 20
    rng = random.Random(7)
    outcomes = {"refused": 0, "harmless": 0}
    harmless = []
    for f in files:
        trial = tmp_path / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(source, trial)
        flip_bit(trial / f.relative_to(source), rng)
        try:
            got = _full_restore(trial, 24)
        except (CheckpointError, CheckpointMismatchError) as e:
            assert "checkpoints/24" in str(e) or "checkpoints" in str(e), str(e)
            outcomes["refused"] += 1
            continue
        for a, b in zip(got[0] + got[1], original[0] + original[1]):
            np.testing.assert_array_equal(a, b, err_msg=f"a flip in {f} loaded wrong values")
        assert got[2] == original[2], f"a flip in {f} changed the data state"
        outcomes["harmless"] += 1
        harmless.append(str(f.relative_to(source / "checkpoints" / "24")))
    print(outcomes, "harmless:", harmless)
    # What is read into the run is verified: a flip in the manifest, the data state or the
    # arrays' bytes is always refused (flips in metadata orbax does not use are harmless).
    largest = {
        max((p for p in files if item in p.parts), key=lambda p: p.stat().st_size)
        for item in ("params", "opt_state")
    }
    verified = {"meta/metadata", "data/process_0-of-1.json"} | {
        str(p.relative_to(source / "checkpoints" / "24")) for p in largest
    }
    assert not verified & set(harmless), harmless


def test_a_corrupt_checkpoint_is_refused_and_resume_from_intact_falls_back(tmp_path):
    """A flipped bit in an array file of the newest checkpoint: the resume is refused naming
    the step directory and the flag; with the flag it resumes from the newest intact step,
    sets the corrupt one aside (nothing deleted) and ends bit-identical to the reference."""
    result, ref_params = reference_run()
    run_dir = _copy_reference(tmp_path)
    big = max(
        (p for p in (run_dir / "checkpoints" / "40" / "params").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    flip_bit(big, random.Random(3))
    with pytest.raises(CheckpointCorruptError, match=r"(?s)checkpoints/40.*--resume-from-intact"):
        train(smoke(), run_dir)
    assert (run_dir / "checkpoints" / "40").is_dir()  # refusing changed nothing
    final = train(smoke(), run_dir, resume_from_intact=True)
    assert final.step == 40
    resume = read_metrics(run_dir / "metrics.jsonl", "resume")[-1]
    assert resume["step"] == 30 and "checkpoints/40" in resume["corrupt"][0]
    assert [Path(p).parent.name for p in resume["set_aside"]] == ["corrupt-checkpoints"]
    assert any((run_dir / "corrupt-checkpoints").iterdir())
    for a, b in zip(params_of(final.model), ref_params):
        np.testing.assert_array_equal(a, b)
    assert train_losses(run_dir / "metrics.jsonl") == train_losses(result.metrics_path)
    # metrics.jsonl was cut back to step 30: steps 31..40 are there once, not twice.
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert steps == list(range(1, 41))


def test_unreadable_checkpoints_name_the_step_directory(tmp_path):
    run_dir = _copy_reference(tmp_path)
    (run_dir / "checkpoints" / "40" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match=r"(?s)checkpoints/40.*no readable manifest"):
        train(smoke(), run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "40")
    for f in (run_dir / "checkpoints" / "30" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointCorruptError, match=r"(?s)checkpoints/30.*corrupt.*intact"):
        load_checkpoint(run_dir)


def test_readers_polling_a_live_run_never_disturb_it_and_a_second_writer_is_refused(
    tmp_path,
):
    """Two training commands start at once on one directory: exactly one wins the lock, the
    other is refused at once naming the winner's pid. While the winner runs, this process
    loads its latest checkpoint 20 times; the run finishes with all its checkpoints and the
    reference's losses."""
    reference = subprocess_reference()
    out = tmp_path / "live"
    args = smoke_cli_args(out, "--set", f"keep_checkpoints={len(SMOKE_CHECKPOINTS)}")
    procs = [
        subprocess.Popen(
            [*TRAIN_CMD, *args, "--devices", str(other_device_count())],
            env=subprocess_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        line = one_line_error(loser.communicate()[1])
        assert loser.returncode == 2
        assert f"pid {winner.pid}" in line and "another --out" in line
        while winner.poll() is None and _latest_step(out) is None:
            time.sleep(0.05)
        loaded, seen = 0, set()
        for _ in range(20):
            try:
                model, _, manifest = load_checkpoint(out)
                assert model.depth == manifest["depth"]
                seen.add(manifest["step"])
                loaded += 1
            except CheckpointError as e:  # a step removed while read: only that, clearly
                assert "disappeared while being read" in str(e)
            time.sleep(0.2)
        assert loaded >= 15
        _, err = winner.communicate(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert winner.returncode == 0, err[-3000:]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == SMOKE_CHECKPOINTS
    assert train_losses(out / "metrics.jsonl") == train_losses(reference / "metrics.jsonl")


def test_a_refused_resume_on_the_command_line_is_one_line(tmp_path):
    run_dir = _copy_reference(tmp_path)
    flip_bit(run_dir / "checkpoints" / "40" / "data" / "process_0-of-1.json", random.Random(5))
    proc = run_cli(smoke_cli_args(run_dir), check=False)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "checkpoints/40" in line and "--resume-from-intact" in line
