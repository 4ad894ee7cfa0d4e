"""Metrics sinks (the MetricsSink hook, TensorBoardSink) and the plain progress lines that
replace the bar when the output is not a terminal (nohup, SLURM logs)."""

import dataclasses
import fcntl
import io
import json
import os
import pty
import re
import struct
import sys
import termios

import pytest
from harness_support import smoke

from stackops_harness import metrics as metrics_mod
from stackops_harness.metrics import (
    MetricsLog,
    MetricsSink,
    Progress,
    TensorBoardSink,
    read_metrics,
)
from stackops_harness.trainer import train


class Collect:
    """A sink that keeps what it is given."""

    def __init__(self):
        self.records, self.closed = [], 0

    def write(self, record):
        self.records.append(dict(record))

    def close(self):
        self.closed += 1


def read_scalars(logdir):
    """`[(tag, step, value)]` and the purge steps of every event file in `logdir`, parsed
    from the TFRecord framing with tensorboardX's own protobuf classes."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars, purges = [], []
    for name in sorted(os.listdir(logdir)):
        data = (logdir / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                purges.append(event.step)
            for v in event.summary.value:
                scalars.append((v.tag, event.step, v.simple_value))
    return scalars, purges


# --------------------------------------------------------------------------- progress lines


def test_without_a_terminal_each_logged_update_prints_one_line_with_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(total=100, initial=0, enabled=True, stream=out)
    bar.update(1)  # step 1 at t=100: the ETA clock starts at the first step
    for _ in range(10):
        now[0] += 1.0
        bar.update(1)  # no values: no line
    assert out.getvalue() == ""
    bar.update(0, loss=3.45678, stage="2/4", depth=4, tok_s=12345.6)
    bar.write("step 11: grew 2 -> 3 blocks")
    bar.close()
    lines = out.getvalue().splitlines()
    # 10 steps in 10 s since step 1: 1 s per step, 89 steps left.
    assert lines == [
        "step 11/100  stage 2/4  depth 4  loss 3.4568  12,346 tok/s  ETA 0:01:29",
        "step 11: grew 2 -> 3 blocks",
    ]


def test_a_resumed_run_counts_steps_and_eta_from_where_it_resumed(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(total=10_000, initial=5000, enabled=True, stream=out)
    bar.update(0, loss=1.0)  # before any step: no ETA yet
    bar.update(1)
    now[0] += 7200.0
    bar.update(2, loss=2.0)
    assert out.getvalue().splitlines() == [
        "step 5000/10000  loss 1.0000  ETA ?",
        # 3600 s per step since step 5001, 4997 steps left: 208 days and 5 hours.
        "step 5003/10000  loss 2.0000  ETA 208d 5:00:00",
    ]


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = Progress(total=10, initial=0, enabled=False, stream=out)
    bar.update(1, loss=1.0)
    bar.write("hello")
    assert out.getvalue() == ""


def test_on_a_terminal_the_bar_replaces_the_lines(monkeypatch):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    tty = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", tty)
        bar = Progress(total=50, initial=0, enabled=True, stream=tty)
        assert bar.lines is False
        bar.update(5, loss=2.5, stage="1/4", depth=1, tok_s=10.0)
        bar.close()
        tty.flush()
        shown = os.read(master, 65536).decode()
        assert "5/50" in shown and "ETA" not in shown  # tqdm's bar, not our line
    finally:
        tty.close()
        os.close(master)


# --------------------------------------------------------------------------- sinks


def test_metrics_log_sends_every_record_to_its_sinks_and_closes_them(tmp_path):
    sink = Collect()
    assert isinstance(sink, MetricsSink)
    log = MetricsLog(tmp_path / "m.jsonl", keep_until=None, sinks=[sink])
    log.write({"kind": "train", "step": 1, "loss": float("nan")})
    log.write({"kind": "eval", "step": 2, "val_loss": 1.5})
    log.close()
    log.close()
    assert sink.records == read_metrics(tmp_path / "m.jsonl")
    assert sink.records[0]["loss"] == "nan"  # sinks get the JSON-ready record
    assert sink.closed == 1


def test_disabled_log_writes_no_sink_and_a_bad_sink_is_refused(tmp_path):
    sink = Collect()
    log = MetricsLog(tmp_path / "m.jsonl", keep_until=None, enabled=False, sinks=[sink])
    log.write({"kind": "train", "step": 1})
    log.close()
    assert sink.records == [] and sink.closed == 0
    with pytest.raises(TypeError, match=r"write\(record\) and close\(\)"):
        MetricsLog(tmp_path / "m.jsonl", keep_until=None, sinks=[print])


def test_tensorboard_sink_writes_numeric_fields_and_purges_after_a_resume(tmp_path):
    pytest.importorskip("tensorboardX")
    sink = TensorBoardSink(tmp_path)
    sink.write({"kind": "start", "step": 0, "method": "midas", "params": 1000})
    sink.write({"kind": "train", "step": 10, "loss": 5.5, "tokens_per_s": None, "ok": True})
    sink.write({"kind": "eval", "step": 10, "val_loss": 5.25, "ops": ["x"]})
    sink.close()
    resumed = TensorBoardSink(tmp_path, kinds=["train"])
    resumed.write({"kind": "resume", "step": 20, "params": 1000})
    resumed.write({"kind": "train", "step": 21, "loss": 4.0})
    resumed.write({"kind": "eval", "step": 21, "val_loss": 4.0})
    resumed.close()
    with pytest.raises(ValueError, match="after close"):
        resumed.write({"kind": "train", "step": 22, "loss": 1.0})
    scalars, purges = read_scalars(tmp_path)
    assert sorted(scalars) == [
        ("eval/val_loss", 10, 5.25),
        ("start/params", 0, 1000.0),
        ("train/loss", 10, 5.5),
        ("train/loss", 21, 4.0),
    ]
    assert purges == [21]  # TensorBoard hides what the first segment logged after step 20


def test_training_feeds_sinks_and_prints_a_line_per_log_interval(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    collect = Collect()
    cfg = dataclasses.replace(smoke(log_every=5), progress=True)
    result = train(cfg, tmp_path / "run", sinks=[collect, TensorBoardSink(tmp_path / "tb")])
    out = capsys.readouterr().out  # captured: not a terminal, as under nohup
    records = read_metrics(result.metrics_path)
    assert json.loads(json.dumps(collect.records)) == records and collect.closed == 1
    assert records[0]["provenance"]["packages"]["jax"]
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert set(saved.pop("provenance")) >= {"git", "packages", "hostname", "device_kind"}

    train_recs = [r for r in records if r["kind"] == "train"]
    lines = [line for line in out.splitlines() if "ETA" in line]
    assert len(lines) == len(train_recs) and len(lines) >= 8  # every 5 of 40 steps, at least
    for line, r in zip(lines, train_recs):
        m = re.fullmatch(
            r"step (\d+)/40  stage (\d)/4  depth (\d)  loss (\S+)  [\d,]+ tok/s  ETA (\S+)", line
        )
        assert m, line
        assert (int(m[1]), int(m[2]), int(m[3])) == (r["step"], r["stage"], r["depth"])
        assert m[4] == f"{r['loss']:.4f}"
    tb, _ = read_scalars(tmp_path / "tb")
    tb_loss = {step: v for tag, step, v in tb if tag == "train/loss"}
    assert tb_loss == pytest.approx({r["step"]: r["loss"] for r in train_recs}, rel=1e-6)
