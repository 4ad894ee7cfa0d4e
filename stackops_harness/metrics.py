"""Metrics as JSON lines, a wall clock split by activity, and a progress bar.

Every record in `metrics.jsonl` is one JSON object with a `kind`:

- `"train"`: `step`, `stage` (1-based), `depth`, `loss` (mean over the steps since the
  last record), `loss_last`, `grad_norm`, `lr`, cumulative `tokens` and `flops` (model
  FLOPs counted from the architecture at each stage), `tokens_per_s` and `flops_per_s`
  over the window, and the cumulative wall time per activity (`time_init` (setup,
  initialisation, restore), `time_train`, `time_compile`, `time_grow`, `time_ckpt`,
  `time_eval`, and their sum `time_total`).
- `"eval"`: `step`, `stage`, `depth`, `val_loss`, plus whatever an `on_eval` hook returns.
- `"grow"`, `"compile"`, `"checkpoint"`: one per event, with its `seconds`.
- `"start"`, `"resume"`, `"end"`: the run's life.

A resumed run first drops the records written after the checkpoint it resumes from, so
the file reads as if the run had never stopped.

Other destinations plug in as *metrics sinks*: any object with `write(record)` and
`close()` (the [`MetricsSink`][] protocol), passed as `train(..., sinks=[...])`. Every
record written to `metrics.jsonl` goes to each sink too. [`TensorBoardSink`][] is one,
writing TensorBoard event files offline with `tensorboardX`.

[`Progress`][] shows a tqdm bar on a terminal. Without one (`nohup`, a SLURM log) it
prints one line per log interval instead:

    step 120/1000  stage 2/4  depth 4  loss 3.4512  12,345 tok/s  ETA 0:05:12
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

__all__ = [
    "MetricsLog",
    "MetricsSink",
    "TensorBoardSink",
    "Clock",
    "Progress",
    "read_metrics",
    "ACTIVITIES",
]

ACTIVITIES = ("init", "train", "compile", "grow", "ckpt", "eval")


@runtime_checkable
class MetricsSink(Protocol):
    """Where metrics records go besides `metrics.jsonl`: anything with `write` and `close`.

    `write(record)` receives each record as it is logged: a mapping with `kind` (`"train"`,
    `"eval"`, `"grow"`, `"compile"`, `"checkpoint"`, `"start"`, `"resume"`, `"end"`), and
    `step` and the fields listed at the top of this module, with JSON-ready values (numbers,
    strings, lists, `None`). `close()` is called once when the run ends (or fails). A
    resumed run's first record is `{"kind": "resume", "step": n, ...}`: records with a
    later step that the sink saw before are superseded (see [`TensorBoardSink`][]). Only
    the first process of a multi-process run writes.

    !!! Example

        ```python
        class PrintLosses:
            def write(self, record):
                if record["kind"] == "eval":
                    print(record["step"], record["val_loss"])

            def close(self):
                pass

        assert isinstance(PrintLosses(), MetricsSink)
        # train(config, run_dir, sinks=[PrintLosses()])
        ```
    """

    def write(self, record: Mapping[str, Any]) -> None:
        """Take one record."""
        ...

    def close(self) -> None:
        """Flush and release resources; no `write` follows."""
        ...


class MetricsLog:
    """An append-only JSON-lines file, truncated to a step when a run resumes.

    **Arguments:**

    - `path`: the file (`run_dir / "metrics.jsonl"`).
    - `keep_until`: drop existing records with `step > keep_until` (and any line cut short
      by a crash) before appending; `None` starts the file afresh.
    - `enabled`: `False` writes nothing (every process but the first in a multi-process run).
    - `sinks`: [`MetricsSink`][]s that receive every record written here (and are closed
      with it).

    !!! Example

        ```python
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
        log = MetricsLog(path, keep_until=None)
        log.write({"kind": "train", "step": 1, "loss": 5.5})
        log.close()
        assert read_metrics(path)[0]["loss"] == 5.5
        ```
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep_until: int | None,
        enabled: bool = True,
        sinks: Sequence[MetricsSink] = (),
    ):
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        for sink in sinks:
            if not isinstance(sink, MetricsSink):
                raise TypeError(
                    f"MetricsLog: every sink needs write(record) and close() methods, got "
                    f"{type(sink).__name__}."
                )
        self.sinks = list(sinks) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if keep_until is not None and self.path.exists():
            for record in _parse_lines(self.path):
                if record.get("step", 0) <= keep_until:
                    kept.append(json.dumps(record))
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (flushed at once, so a killed run loses at most this line)."""
        if self._file is None:
            return
        clean = _jsonable(record)
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.write(clean)

    def close(self) -> None:
        """Close the file and the sinks."""
        if self._file is not None:
            self._file.close()
            self._file = None
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


class TensorBoardSink:
    """A [`MetricsSink`][] writing TensorBoard event files (offline, with `tensorboardX`).

    Every numeric field of a record becomes a scalar tagged `"{kind}/{field}"` at the
    record's `step` (`train/loss`, `train/tokens_per_s`, `eval/val_loss`, `grow/seconds`,
    ...); strings, lists and `None` are skipped. When a run resumes from step `n`, the
    writer is opened with `purge_step=n + 1`, so TensorBoard hides what a crashed segment
    logged after that checkpoint, as `metrics.jsonl` drops it.

    **Arguments:**

    - `logdir`: the directory for the event files (e.g. `run_dir / "tb"`); view with
      `tensorboard --logdir DIR`.
    - `kinds`: the record kinds to write (default: all).

    **Raises:** `ImportError` naming the package (`pip install "tensorboardX==2.6.5"`, part
    of the `experiments` extra) if `tensorboardX` is missing.

    !!! Example

        ```python
        import tempfile

        sink = TensorBoardSink(tempfile.mkdtemp())
        sink.write({"kind": "train", "step": 10, "loss": 5.1, "tokens_per_s": 1e4})
        sink.close()
        # train(config, run_dir, sinks=[TensorBoardSink(f"{run_dir}/tb")])
        ```
    """

    def __init__(self, logdir: str | os.PathLike[str], *, kinds: Sequence[str] | None = None):
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ImportError(
                'TensorBoardSink needs tensorboardX: pip install "tensorboardX==2.6.5" (part '
                "of the experiments extra)."
            ) from e
        self.logdir = Path(logdir)
        self.kinds = None if kinds is None else frozenset(kinds)
        self._writer: Any = None
        self._closed = False

    def _open(self, purge_step: int | None) -> Any:
        from tensorboardX import SummaryWriter

        # tensorboardX names event files by the second and the host: a suffix keeps a quick
        # resume (or a second sink on one directory) from overwriting the earlier file.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._writer = SummaryWriter(
            str(self.logdir), purge_step=purge_step, flush_secs=10, filename_suffix=suffix
        )
        return self._writer

    def write(self, record: Mapping[str, Any]) -> None:
        """Write the record's numeric fields as scalars at its step."""
        if self._closed:
            raise ValueError("TensorBoardSink.write after close.")
        kind, step = record.get("kind"), record.get("step")
        writer = self._writer
        if writer is None:
            purge = int(step) + 1 if kind == "resume" and isinstance(step, int) else None
            writer = self._open(purge)
        if not isinstance(step, int) or (self.kinds is not None and kind not in self.kinds):
            return
        for field, value in record.items():
            if field in ("kind", "step") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                writer.add_scalar(f"{kind}/{field}", float(value), global_step=step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file (optionally only those of one `kind`).

    !!! Example

        ```python
        def val_curve(run_dir):
            evals = read_metrics(f"{run_dir}/metrics.jsonl", kind="eval")
            return [(r["step"], r["val_loss"]) for r in evals]
        ```
    """
    records = list(_parse_lines(Path(path)))
    return [r for r in records if kind is None or r.get("kind") == kind]


def _parse_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                yield record


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


class Clock:
    """Wall time split by activity: every second between two `lap`s goes to one name.

    **Arguments:**

    - `totals`: starting totals (restored from a checkpoint's manifest).

    !!! Example

        ```python
        clock = Clock()
        # ... compile ...
        clock.lap("compile")
        # ... train steps, then a device sync ...
        clock.lap("train")
        assert clock.total == clock.totals["compile"] + clock.totals["train"]
        ```
    """

    def __init__(self, totals: Mapping[str, float] | None = None):
        self.totals: dict[str, float] = defaultdict(float)
        for name in ACTIVITIES:
            self.totals[name] = float((totals or {}).get(name, 0.0))
        self._mark = time.perf_counter()

    def restore(self, totals: Mapping[str, float]) -> None:
        """Add the totals of an earlier segment of the run (from a checkpoint's manifest)."""
        for name, value in totals.items():
            self.totals[name] += float(value)

    def lap(self, name: str) -> float:
        """Charge the time since the last lap to `name`; return that time in seconds."""
        now = time.perf_counter()
        dt = now - self._mark
        self.totals[name] += dt
        self._mark = now
        return dt

    @property
    def total(self) -> float:
        """All time charged so far."""
        return sum(self.totals.values())

    def as_record(self) -> dict[str, float]:
        """`{"time_train": ..., ..., "time_total": ...}` for a metrics record."""
        out = {f"time_{k}": round(v, 6) for k, v in self.totals.items()}
        out["time_total"] = round(self.total, 6)
        return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{sec:02d}"


class Progress:
    """Progress of a run: a tqdm bar on a terminal, one plain line per log interval otherwise.

    On a terminal (stderr is a TTY) a tqdm bar shows the step, loss, stage and throughput.
    When `stream` (default stdout) is not a terminal, as under `nohup` or in a SLURM log,
    every `update` that carries values (the trainer's, once per `log_every` steps) prints
    one line to it: step, stage, depth, loss, tokens/s and the estimated time left (from
    the wall time per step of this process, compilation and evaluation included):

        step 120/1000  stage 2/4  depth 4  loss 3.4512  12,345 tok/s  ETA 0:05:12

    **Arguments:**

    - `total`: the run's steps; `initial`: the step it starts at (a resumed run's).
    - `enabled`: `False` shows nothing (`TrainConfig.progress=false`, or not the first
      process).
    - `stream`: where plain lines and messages go (default `sys.stdout`).

    !!! Example

        ```python
        import io

        out = io.StringIO()   # not a terminal, like a SLURM log
        bar = Progress(total=1000, initial=0, enabled=True, stream=out)
        bar.update(10, loss=5.1, stage="1/4", depth=2, tok_s=12000.0)
        bar.close()
        assert out.getvalue().startswith("step 10/1000  stage 1/4  depth 2  loss 5.1000")
        ```
    """

    def __init__(self, total: int, initial: int, enabled: bool, *, stream: IO[str] | None = None):
        self._bar: Any = None
        self.enabled = enabled
        self.total, self.step = total, initial
        self._stream = stream
        self._start: tuple[float, int] | None = None  # set at the first step taken
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        out = self.stream
        self.lines = enabled and not (hasattr(out, "isatty") and out.isatty() and self._bar)

    @property
    def stream(self) -> IO[str]:
        """Where plain lines go (`sys.stdout` unless given)."""
        return self._stream if self._stream is not None else sys.stdout

    def eta(self) -> float | None:
        """Seconds left at this process's average wall time per step since its first step
        (setup and the first compilation excluded; `None` until two steps are done)."""
        if self._start is None:
            return None
        t0, step0 = self._start
        done = self.step - step0
        if done <= 0:
            return None
        return (time.perf_counter() - t0) / done * max(self.total - self.step, 0)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps; with `postfix` values, show them (a line without a terminal).

        The trainer passes `loss`, `stage` (`"2/4"`), `depth` and `tok_s`; other keys are
        shown too.
        """
        self.step += n
        if n > 0 and self._start is None:
            self._start = (time.perf_counter(), self.step)
        if self._bar is not None:
            if postfix:
                shown = {}
                for k, v in postfix.items():
                    shown[k] = f"{v:.4g}" if isinstance(v, float) else v
                self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        if self.lines and postfix:
            print(self._line(postfix), file=self.stream, flush=True)

    def _line(self, values: Mapping[str, Any]) -> str:
        parts = [f"step {self.step}/{self.total}"]
        rest = dict(values)
        for key in ("stage", "depth"):
            if key in rest:
                parts.append(f"{key} {rest.pop(key)}")
        if "loss" in rest:
            loss = rest.pop("loss")
            parts.append(f"loss {loss:.4f}" if isinstance(loss, float) else f"loss {loss}")
        tok_s = rest.pop("tok_s", None)
        if isinstance(tok_s, (int, float)):
            parts.append(f"{tok_s:,.0f} tok/s")
        for k, v in rest.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        eta = self.eta()
        parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA ?")
        return "  ".join(parts)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plainly when there is no bar)."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
