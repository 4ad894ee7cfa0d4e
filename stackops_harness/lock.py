"""One writer per run directory: an advisory lock held by the trainer for the whole run.

The lock is `run_dir/lock`, a small JSON file (pid, host, start time, command) that the
writer keeps open with an exclusive `flock`. The kernel drops a `flock` when its process
dies, however it dies (even `SIGKILL`), so a lock left behind by a killed trainer is
recognised as stale simply because nobody holds it any more, and taking it over is the
same atomic `flock` call that any writer makes: of two processes racing for a stale lock,
exactly one wins. The file itself is never deleted, so there is no window in which two
writers could each create their own.

Readers ([`load_checkpoint`][stackops_harness.checkpoint.load_checkpoint], evaluation and
report scripts) never take the lock: they open checkpoints read-only and change nothing.
This module imports only the standard library.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "lock_holder"]

LOCK_NAME = "lock"


class RunLockedError(RuntimeError):
    """Another live process is writing to this run directory."""


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (its lock file is unreadable)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')!r} since {info.get('since')} "
        f"(command: {info.get('command', '?')})"
    )


def lock_holder(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the lock file of `run_dir` says about its last writer, or `None`.

    This only reads the file: it says who took the lock last, not whether that process
    still holds it.

    !!! Example

        ```python
        import tempfile

        d = tempfile.mkdtemp()
        with RunLock(d):
            assert lock_holder(d)["pid"] == os.getpid()
        ```
    """
    path = Path(run_dir) / LOCK_NAME
    for _ in range(20):  # the holder may be rewriting it this instant
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else None
        except json.JSONDecodeError:
            time.sleep(0.01)
    return None


class RunLock:
    """The exclusive writer's lock of a run directory.

    **Arguments:**

    - `run_dir`: the run directory (created if needed).

    `acquire()` (or entering the `with` block) takes the lock or raises
    [`RunLockedError`][] at once, naming the holder (pid, host, since when) and what to
    do; a lock whose process is gone is taken over. `release()` (or leaving the block)
    gives it back. Within one process, a second `RunLock` on the same directory is
    refused as well.

    !!! Example

        ```python
        import tempfile

        d = tempfile.mkdtemp()
        with RunLock(d) as lock:
            try:
                RunLock(d).acquire()
            except RunLockedError as e:
                assert str(os.getpid()) in str(e)
        assert lock.previous is None   # nobody had written here before
        ```
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict[str, Any] | None = None
        """What the lock file said before this lock took it (a stale holder), or `None`."""

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise [`RunLockedError`][] naming the live holder."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OSError(
                    f"Cannot lock the run directory {self.run_dir} ({e}); its filesystem must "
                    "support flock. Use a run directory on a local or NFSv4 filesystem."
                ) from e
            holder = lock_holder(self.run_dir)
            raise RunLockedError(
                f"The run directory {self.run_dir} is being written by {_describe(holder)}. "
                "Wait for that run to finish (or stop it), or use another --out / run_dir; "
                "reading its checkpoints (load_checkpoint) is safe meanwhile."
            ) from None
        try:
            old = os.read(fd, 1 << 16).decode("utf-8", errors="replace")
            try:
                self.previous = json.loads(old) if old.strip() else None
            except json.JSONDecodeError:
                self.previous = None
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "command": " ".join(sys.argv) or sys.executable,
            }
            payload = (json.dumps(info) + "\n").encode("utf-8")
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, payload)
            os.fsync(fd)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (safe to call twice). The file stays, for the record."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
