"""Every Python example in the docs and in public docstrings runs, so none can rot."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest

import stackops
import stackops.models

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _doc_pages():
    return sorted(p for p in (ROOT / "docs").rglob("*.md") if FENCE.search(p.read_text()))


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_examples_run(page):
    if "stackops_harness" in page.read_text():
        # Pages about the harness need the experiments extra (CI installs it).
        pytest.importorskip("grain", reason="the page uses the harness (experiments extra)")
    namespace: dict = {"__name__": "__docs__"}
    for block in FENCE.findall(page.read_text()):
        exec(compile(textwrap.dedent(block), str(page), "exec"), namespace)


def _public_objects():
    out = []
    for mod in (stackops, stackops.models):
        for name in sorted(n for n in dir(mod) if not n.startswith("_")):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith("stackops"):
                continue
            out.append((f"{mod.__name__}.{name}", obj))
    return out


def _examples(obj) -> list[str]:
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        for _, member in inspect.getmembers(obj):
            if getattr(member, "__qualname__", "").startswith(obj.__name__ + "."):
                docs.append(inspect.getdoc(member) or "")
    return [textwrap.dedent(b) for d in docs for b in FENCE.findall(d)]


@pytest.mark.parametrize("name,obj", _public_objects(), ids=[n for n, _ in _public_objects()])
def test_public_docstring_examples_run(name, obj):
    for block in _examples(obj):
        exec(compile(block, name, "exec"), {"__name__": "__doctest__"})


def test_every_public_function_and_class_has_a_docstring_with_an_example():
    missing = []
    for name, obj in _public_objects():
        if not _examples(obj):
            missing.append(name)
    assert not missing, f"public names without a runnable example: {missing}"
