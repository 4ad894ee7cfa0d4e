"""The docstring examples of the evaluation and ensemble modules run (as test_harness_docs.py
does for the older harness modules)."""

from __future__ import annotations

import doctest
import importlib

import pytest
from test_docs import _examples


@pytest.mark.parametrize("module", ["claims", "ensemble"])
def test_markdown_examples_run(module, tmp_path, monkeypatch):
    mod = importlib.import_module(f"stackops_harness.{module}")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for name in mod.__all__:
        for block in _examples(getattr(mod, name)):
            exec(compile(block, f"stackops_harness.{module}.{name}", "exec"),
                 {**vars(mod), "__name__": "__doc__"})
            ran += 1
    assert ran > 0


@pytest.mark.parametrize("module", ["tokenizer", "stats"])
def test_doctest_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"stackops_harness.{module}"))
    assert result.attempted > 0 and result.failed == 0
