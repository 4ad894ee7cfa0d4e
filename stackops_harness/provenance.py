"""Where a run came from: the source commit, package versions, host and devices.

[`provenance`][] gathers it into one JSON-ready dict; the trainer stores it under the key
`"provenance"` of every run directory's `config.json` (next to the config's fields) and in
the `"start"` / `"resume"` record of `metrics.jsonl`, so each segment of a resumed run says
where it ran. Nothing here ever fails a run: a value that cannot be found is `None`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "git_state", "package_versions", "provenance"]

# Distributions whose versions decide what a run computes.
PACKAGES = ("stackops", "jax", "jaxlib", "equinox", "optax")

_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout, for an editable install


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # a status never takes the lock
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return result.stdout if result.returncode == 0 else None


def git_state(root: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The git commit of the source tree at `root` and whether it has uncommitted changes.

    `root` defaults to the directory holding the `stackops_harness` package, which is the
    checkout for an editable install (`pip install -e`). Only a repository whose top level
    *is* `root` counts: an install in `site-packages` (even inside some other repository,
    as a project's `.venv` is) has no commit, and gives `None`, as does a machine without
    `git`.

    **Returns:** `{"commit": "<40 hex digits>", "dirty": bool}` (`dirty`: tracked files
    differ from the commit), or `None`.

    !!! Example

        ```python
        import tempfile

        assert git_state(tempfile.mkdtemp()) is None   # not a checkout
        state = git_state()
        assert state is None or len(state["commit"]) == 40
        ```
    """
    path = Path(root).resolve() if root is not None else _SOURCE_ROOT
    top = _git(path, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != path:
        return None
    commit = _git(path, "rev-parse", "HEAD")
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in `names` (`None` if not installed).

    !!! Example

        ```python
        import jax

        assert package_versions(("jax",)) == {"jax": jax.__version__}
        ```
    """
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _devices() -> dict[str, Any]:
    try:
        import jax

        devices = jax.devices()
        return {
            "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind if devices else None,
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
        }
    except Exception:  # no usable backend: provenance never fails the run
        return {"backend": None, "device_kind": None, "device_count": None, "process_count": None}


def provenance(*, devices: bool = True) -> dict[str, Any]:
    """Where this process runs: source commit, versions, host and devices, JSON-ready.

    **Arguments:**

    - `devices`: also ask JAX for the backend and device kind (this starts JAX's backend;
      `False` leaves JAX untouched, e.g. before `XLA_FLAGS` are final).

    **Returns:** a dict with `git` (see [`git_state`][]), `python` (version),
    `packages` (see [`package_versions`][]), `hostname`, `platform` (OS and machine) and,
    with `devices=True`, `backend`, `device_kind` (e.g. `"cpu"`, `"NVIDIA H100 80GB
    HBM3"`), `device_count` and `process_count`.

    !!! Example

        ```python
        import json

        info = provenance()
        assert info["packages"]["jax"] and info["device_kind"]
        json.dumps(info)   # JSON-ready
        ```
    """
    info: dict[str, Any] = {
        "git": git_state(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
    }
    if devices:
        info.update(_devices())
    return info
