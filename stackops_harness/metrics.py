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
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "Clock", "Progress", "read_metrics", "ACTIVITIES"]

ACTIVITIES = ("init", "train", "compile", "grow", "ckpt", "eval")


class MetricsLog:
    """An append-only JSON-lines file, truncated to a step when a run resumes.

    **Arguments:**

    - `path`: the file (`run_dir / "metrics.jsonl"`).
    - `keep_until`: drop existing records with `step > keep_until` (and any line cut short
      by a crash) before appending; `None` starts the file afresh.
    - `enabled`: `False` writes nothing (every process but the first in a multi-process run).

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
        self, path: str | os.PathLike[str], *, keep_until: int | None, enabled: bool = True
    ):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
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
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


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


class Progress:
    """A tqdm progress bar with loss, stage and throughput; silent when not on a terminal.

    !!! Example

        ```python
        bar = Progress(total=1000, initial=0, enabled=False)   # True: a bar on a terminal
        bar.update(1, loss=5.1, stage=1, depth=2, tokens_per_s=12000.0)
        bar.close()
        ```
    """

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps, showing `postfix` values when given."""
        if self._bar is None:
            return
        if postfix:
            shown = {}
            for k, v in postfix.items():
                shown[k] = f"{v:.4g}" if isinstance(v, float) else v
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plainly when there is no bar)."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
