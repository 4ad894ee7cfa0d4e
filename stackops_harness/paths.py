"""Where the harness keeps files it builds itself (token corpora), outside any checkout."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root"]


def data_root() -> Path:
    """The directory for corpora the harness builds on its own: `$STACKOPS_DATA_DIR` if set,
    else `$XDG_CACHE_HOME/stackops/data` (default `~/.cache/stackops/data`).

    The default corpus of `train.py` lives in `data_root() / "stdlib"`, the mixed corpora of
    `midas.py` and `looped.py` in `data_root() / "mix-<hash>"`. Pass `data_dir=` (a config
    field) to train on token files of your own instead.

    !!! Example

        ```python
        import os
        from stackops_harness.paths import data_root
        os.environ["STACKOPS_DATA_DIR"] = "/tmp/stackops-data"
        assert str(data_root()) == "/tmp/stackops-data"
        del os.environ["STACKOPS_DATA_DIR"]
        ```
    """
    env = os.environ.get("STACKOPS_DATA_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "stackops" / "data"
