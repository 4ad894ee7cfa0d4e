"""Every docstring example of the harness's modules runs, so none can rot."""

from __future__ import annotations

import pytest
from test_docs import _examples

# stackops_harness.data and .primitives write doctest-style examples, which test_data.py and
# test_primitives.py run with `doctest.testmod`.
HARNESS_MODULES = [
    "attention",
    "checkpoint",
    "config",
    "corpus",
    "evaluate",
    "methods",
    "lock",
    "metrics",
    "paths",
    "provenance",
    "reasoning",
    "report",
    "sharding",
    "state",
    "trainer",
]


@pytest.mark.parametrize("module", HARNESS_MODULES)
def test_harness_docstring_examples_run(module, tmp_path, monkeypatch):
    """The harness is meant to be copied: its examples must run too (in the module's
    namespace, as they are written, from a scratch directory)."""
    import importlib

    mod = importlib.import_module(f"stackops_harness.{module}")
    monkeypatch.chdir(tmp_path)
    names = getattr(mod, "__all__", None) or [
        n
        for n, o in vars(mod).items()
        if not n.startswith("_") and getattr(o, "__module__", None) == mod.__name__
    ]
    ran = 0
    for name in names:
        for block in _examples(getattr(mod, name)):
            exec(
                compile(block, f"stackops_harness.{module}.{name}", "exec"),
                {**vars(mod), "__name__": "__doc__"},
            )
            ran += 1
    assert ran > 0, f"stackops_harness.{module} has no docstring examples"
