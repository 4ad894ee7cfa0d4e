"""The harness tests need the `experiments` extra; without it they are skipped as a whole
(the library's tests in `tests/` run with the core and test extras alone)."""

import pytest

import stackops_harness

_missing = stackops_harness.missing_extras()
if _missing:
    pytest.skip(
        f"the harness tests need the experiments extra ({', '.join(_missing)} missing)",
        allow_module_level=True,
    )
