"""Fault trials for the training harness (slow, opt-in; not collected by pytest).

    python tests/harness/fault_trials.py --kills 30 --flips 120 --readers 3

- kills: smoke runs by the command line, each SIGKILLed once at a seeded random moment of a
  chosen kind (right after a `checkpoint` record: an asynchronous save in flight; right
  after a `compile` record: compiling a stage; right after the last step of a stage: growing)
  and relaunched with the same command; a trial counts as bit-identical when the relaunch
  resumed from the newest checkpoint on disk, metrics.jsonl holds every step once, and the
  losses and final parameters equal an uninterrupted run's.
- flips: one random bit flipped in a random file of a checkpoint, then a full verified
  restore: refused, or harmless (the restored arrays and data state equal the originals),
  or wrong (anything else: the goal is zero).
- readers: a training run polled 20 times by `load_checkpoint` while it runs; survived
  when the run exits 0 with all its checkpoints and the reference's losses.

Prints one summary line per kind of trial and writes them as JSON to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness_support as hs  # noqa: E402
import numpy as np  # noqa: E402

from stackops_harness.checkpoint import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
)
from stackops_harness.metrics import read_metrics  # noqa: E402

BOUNDARIES = {4, 12, 24}


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def _latest(run_dir: Path) -> int | None:
    if not (run_dir / "checkpoints").is_dir():
        return None
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def kill_trial(out: Path, moment: str, rng: random.Random, reference: Path) -> dict:
    cmd = [*hs.TRAIN_CMD, *hs.smoke_cli_args(out), "--devices", str(hs.other_device_count())]
    proc = subprocess.Popen(
        cmd, env=hs.subprocess_env(), cwd=hs.ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # Which occurrence of the moment to kill at: 7 checkpoints, 4 compilations, 3 growths.
    skip = rng.randint(0, {"checkpoint": 6, "compile": 3, "grow": 2}[moment])
    seen, killed_at = 0, None
    metrics = out / "metrics.jsonl"
    done = 0
    while proc.poll() is None:
        records = _lines(metrics)
        new = records[done:]
        done = len(records)
        for r in new:
            hit = (
                r["kind"] == moment
                if moment in ("checkpoint", "compile")
                else r["kind"] == "train" and r["step"] in BOUNDARIES
            )
            if hit:
                seen += 1
                if seen > skip:
                    killed_at = r
                    break
        if killed_at is not None:
            break
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    newest = _latest(out)
    hs.run_cli(hs.smoke_cli_args(out), devices=hs.other_device_count(), timeout=900)
    resume = read_metrics(metrics, "resume")
    steps = [r["step"] for r in read_metrics(metrics, "train")]
    same = (
        hs.train_losses(metrics) == hs.train_losses(reference / "metrics.jsonl")
        and hs.val_losses(metrics) == hs.val_losses(reference / "metrics.jsonl")
    )
    if same:
        a, _, _ = load_checkpoint(out)
        b, _, _ = load_checkpoint(reference)
        same = all(np.array_equal(x, y) for x, y in zip(hs.params_of(a), hs.params_of(b)))
    # With no complete checkpoint yet the relaunch must start afresh; else resume from it.
    resumed = (not resume) if newest is None else bool(resume) and resume[-1]["step"] == newest
    return {
        "moment": moment,
        "killed": killed_at is not None,
        "killed_after": killed_at and {k: killed_at.get(k) for k in ("kind", "step")},
        "newest_checkpoint": newest,
        "resumed_from_newest": resumed,
        "steps_once": steps == list(range(1, 41)),
        "bit_identical": same,
    }


def flip_trials(n: int, rng: random.Random, work: Path) -> dict:
    from test_harness_checkpoint import _full_restore  # the tests' verified full restore

    result, _ = hs.reference_run()
    counts = {"refused": 0, "harmless": 0, "wrong": 0}
    for _ in range(n):
        step = rng.choice(hs.SMOKE_CHECKPOINTS)
        src = result.run_dir
        original = _full_restore(src, step)
        trial = work / "flip"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(src, trial, ignore=shutil.ignore_patterns("lock"))
        files = sorted(p for p in (trial / "checkpoints" / str(step)).rglob("*") if p.is_file())
        hs.flip_bit(rng.choice(files), rng)
        try:
            got = _full_restore(trial, step)
        except (CheckpointError, CheckpointMismatchError):
            counts["refused"] += 1
            continue
        ok = all(
            np.array_equal(a, b) for a, b in zip(got[0] + got[1], original[0] + original[1])
        ) and got[2] == original[2]
        counts["harmless" if ok else "wrong"] += 1
    return counts


def reader_trial(out: Path, reference: Path) -> dict:
    args = hs.smoke_cli_args(out, "--set", f"keep_checkpoints={len(hs.SMOKE_CHECKPOINTS)}")
    proc = subprocess.Popen(
        [*hs.TRAIN_CMD, *args, "--devices", str(hs.other_device_count())],
        env=hs.subprocess_env(), cwd=hs.ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and _latest(out) is None:
        time.sleep(0.05)
    reads = 0
    for _ in range(20):
        try:
            load_checkpoint(out)
            reads += 1
        except CheckpointError:
            pass
        time.sleep(0.2)
    proc.wait()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    ok = (
        proc.returncode == 0
        and steps == hs.SMOKE_CHECKPOINTS
        and hs.train_losses(out / "metrics.jsonl") == hs.train_losses(reference / "metrics.jsonl")
    )
    return {"reads": reads, "survived": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--flips", type=int, default=120)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fault-trials-"))
    summary: dict = {}
    try:
        reference = hs.subprocess_reference()
        if args.flips:
            summary["flips"] = flip_trials(args.flips, rng, work)
            print("flips:", summary["flips"], flush=True)
        if args.readers:
            results = [reader_trial(work / f"reader-{i}", reference) for i in range(args.readers)]
            summary["readers"] = {
                "trials": len(results),
                "survived": sum(r["survived"] for r in results),
                "reads": sum(r["reads"] for r in results),
            }
            print("readers:", summary["readers"], flush=True)
        if args.kills:
            moments = ["checkpoint", "compile", "grow"]
            trials = []
            for i in range(args.kills):
                out = work / f"kill-{i}"
                t0 = time.time()
                trials.append(kill_trial(out, moments[i % 3], rng, reference))
                print(f"kill {i}: {trials[-1]} ({time.time() - t0:.0f} s)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                summary["kills"] = {  # after every trial, so that a partial count is kept
                    "trials": len(trials),
                    "killed": sum(t["killed"] for t in trials),
                    "by_moment": {m: sum(t["moment"] == m for t in trials) for m in moments},
                    "resumed_from_newest": sum(t["resumed_from_newest"] for t in trials),
                    "steps_once": sum(t["steps_once"] for t in trials),
                    "bit_identical": sum(t["bit_identical"] for t in trials),
                }
                print("kills so far:", summary["kills"], flush=True)
            print("kills:", summary["kills"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
