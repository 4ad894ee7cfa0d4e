"""stackops_harness: the training harness around stackops.

Sharded stagewise training of the reference LM (`stackops_harness.trainer`), its config
and presets, checkpoints, token data, the reasoning-primitive evaluations and the reports
of the experiments. The command-line programs live in `stackops_harness.cli` and are
installed as console scripts (`stackops-train`, `stackops-midas`, ...); the scripts in the
repository's `experiments/` folder are thin wrappers around the same modules.

The harness needs the `experiments` extra (`pip install "stackops[experiments]"`): grain,
orbax-checkpoint, matplotlib and tqdm. Importing this package imports nothing heavy, so a
command line can set `XLA_FLAGS` before JAX starts.
"""

from __future__ import annotations

import importlib.util

# Distribution names of the experiments extra, by the module each provides.
_EXTRA = {"grain": "grain", "orbax.checkpoint": "orbax-checkpoint", "matplotlib": "matplotlib",
          "tqdm": "tqdm"}


def missing_extras() -> list[str]:
    """The packages of the `experiments` extra that are not installed.

    !!! Example

        ```python
        import stackops_harness
        assert isinstance(stackops_harness.missing_extras(), list)
        ```
    """
    missing = []
    for module, dist in _EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package (orbax) is absent
            found = False
        if not found:
            missing.append(dist)
    return missing


def require_extras(program: str) -> None:
    """Exit with a one-line message if the `experiments` extra is not installed.

    **Arguments:**

    - `program`: the name shown in the message (the command the user ran).

    !!! Example

        ```python
        import stackops_harness
        if not stackops_harness.missing_extras():
            stackops_harness.require_extras("stackops-train")  # returns quietly
        ```
    """
    missing = missing_extras()
    if missing:
        raise SystemExit(
            f"{program}: needs the experiments extra ({', '.join(missing)} not installed); "
            'install it with `pip install "stackops[experiments]"`.'
        )
