"""Growth methods by name, and the stage schedule they train under.

A method name maps to a `stackops` operator applied at every stage boundary:

| name          | operator                                          |
| ------------- | ------------------------------------------------- |
| `baseline`    | none: the final depth trains for the whole budget |
| `midas`       | `stackops.middle_stack(block=b)`                  |
| `gradstack`   | `stackops.last_stack(block=b)`                    |
| `interpolate` | `stackops.interpolate(block=b, t=interp_t)`       |
| `lidas`       | `stackops.middle_stack(block=b, align="depth")`   |
| `looped`      | `stackops.loop_tie(block=b)`: the middle block runs once more, weights shared |
| `untie`       | `stackops.untie()` (grows nothing alone; use it in a composition) |

`"a+b"` composes operators (`stackops.compose(a, b)`) at every boundary, so
`"looped+untie"` grows exactly like `"midas"`. [`register_method`][] adds a name; any
operator object can also be passed to `train(..., op=...)` with `method="custom"`.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import stackops as so

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "BASELINE",
    "CUSTOM",
    "GrowthSchedule",
    "check_method_name",
    "growth_schedule",
    "method_names",
    "method_operator",
    "register_method",
]

BASELINE = "baseline"
CUSTOM = "custom"

MethodFactory = Callable[["TrainConfig"], so.AbstractGrowth]

_REGISTRY: dict[str, MethodFactory] = {
    "midas": lambda c: so.middle_stack(block=c.block),
    "gradstack": lambda c: so.last_stack(block=c.block),
    "interpolate": lambda c: so.interpolate(block=c.block, t=c.interp_t),
    "lidas": lambda c: so.middle_stack(block=c.block, align="depth"),
    "looped": lambda c: so.loop_tie(block=c.block),
    "untie": lambda c: so.untie(),
}


def method_names() -> list[str]:
    """All method names a config may use (compositions `"a+b"` of the operator names too).

    !!! Example

        ```python
        assert {"baseline", "midas", "gradstack", "custom"} <= set(method_names())
        ```
    """
    return [BASELINE, *_REGISTRY, CUSTOM]


def register_method(name: str, factory: MethodFactory) -> None:
    """Make `name` usable as `TrainConfig.method`.

    **Arguments:**

    - `name`: a new name (letters, digits, `_`, `-`; no `+`).
    - `factory`: a function from the config to a `stackops` operator, usually using
      `config.block`.

    !!! Example

        ```python
        import stackops as so

        register_method("gstack2", lambda c: so.layer_map(lambda n: [*range(n)] * 2))
        ```

        (Tiling doubles the depth, so it reaches `depth` only for matching schedules:
        the trainer checks the depths that a method reaches against the config.)
    """
    if not isinstance(name, str) or not name or "+" in name or name in (BASELINE, CUSTOM):
        raise ValueError(
            f"register_method: `name` must be a non-empty string without '+', other than "
            f"{BASELINE!r} and {CUSTOM!r}; got {name!r}."
        )
    if not callable(factory):
        raise TypeError(f"register_method: `factory` must be callable, got {factory!r}.")
    _REGISTRY[name] = factory


def check_method_name(method: str) -> None:
    """Raise a clear error unless `method` is a known name or a `+` composition of them.

    !!! Example

        ```python
        check_method_name("looped+untie")
        try:
            check_method_name("midsa")
        except ValueError as e:
            print(e)   # TrainConfig.method: unknown method 'midsa'; known methods are ...
        ```
    """
    if method in (BASELINE, CUSTOM):
        return
    parts = method.split("+")
    for part in parts:
        if part not in _REGISTRY:
            known = ", ".join(repr(n) for n in method_names())
            raise ValueError(
                f"TrainConfig.method: unknown method {part!r}"
                + (f" in {method!r}" if len(parts) > 1 else "")
                + f"; known methods are {known}, or compositions such as 'looped+untie'."
            )


def method_operator(config: TrainConfig) -> so.AbstractGrowth | None:
    """The operator that `config.method` applies at every stage boundary (`None` for baseline).

    !!! Example

        ```python
        import stackops
        from stackops_harness.config import preset

        op = method_operator(preset("smoke", method="gradstack"))
        assert op == stackops.last_stack(block=1)
        ```
    """
    if config.method == BASELINE:
        return None
    if config.method == CUSTOM:
        raise ValueError(
            'method="custom" takes its operator from `train(config, run_dir, op=...)`; pass one, '
            'or pick a named method such as "midas".'
        )
    check_method_name(config.method)
    ops = [_REGISTRY[part](config) for part in config.method.split("+")]
    return ops[0] if len(ops) == 1 else so.compose(*ops)


@dataclasses.dataclass(frozen=True)
class GrowthSchedule:
    """When each stage starts and which operator grows the model into it.

    **Attributes:**

    - `lengths`: steps per stage (sum: `total_steps`).
    - `ops`: one operator per boundary (`len(lengths) - 1` of them); `ops[i]` grows stage
      `i` (0-based) into stage `i + 1`.
    - `initial_depth`: the depth of the first stage's model.

    !!! Example

        ```python
        from stackops_harness.config import preset

        sched = growth_schedule(preset("smoke"))   # 40 steps, 4 stages, alpha 1
        assert sched.lengths == (4, 8, 12, 16) and sched.starts == (0, 4, 12, 24)
        assert sched.stage_at(12) == 2
        ```
    """

    lengths: tuple[int, ...]
    ops: tuple[so.AbstractGrowth, ...]
    initial_depth: int

    def __post_init__(self):
        if len(self.ops) != len(self.lengths) - 1:
            raise ValueError(
                f"GrowthSchedule: {len(self.lengths)} stages need {len(self.lengths) - 1} "
                f"operators (one per boundary), got {len(self.ops)}."
            )

    @property
    def num_stages(self) -> int:
        """Number of stages (1 for the baseline)."""
        return len(self.lengths)

    @property
    def starts(self) -> tuple[int, ...]:
        """The global step at which each stage starts."""
        return so.stage_starts(self.lengths)

    @property
    def total_steps(self) -> int:
        """The whole budget."""
        return sum(self.lengths)

    def stage_at(self, step: int) -> int:
        """The 0-based stage that trains global step `step` (the update from `step` to
        `step + 1`)."""
        return max(0, min(bisect.bisect_right(self.starts, step) - 1, self.num_stages - 1))

    def describe(self) -> list[str]:
        """One readable line per boundary: `step N: <operator>`."""
        return [f"step {s}: {op!r}" for s, op in zip(self.starts[1:], self.ops)]


def growth_schedule(
    config: TrainConfig, op: so.AbstractGrowth | Sequence[so.AbstractGrowth] | None = None
) -> GrowthSchedule:
    """The stage schedule of a config: Prop-α lengths and one operator per boundary.

    **Arguments:**

    - `config`: the run's config.
    - `op`: only with `method="custom"`: one operator used at every boundary, or a sequence
      of `stages - 1` operators, one per boundary.

    **Returns:** a [`GrowthSchedule`][]. The baseline has one stage at the final depth.

    !!! Example

        ```python
        import stackops as so
        from stackops_harness.config import preset

        cfg = preset("smoke", method="custom")
        sched = growth_schedule(cfg, op=so.interpolate(block=1, t=0.25))
        assert len(sched.ops) == 3
        ```
    """
    if config.method == BASELINE:
        if op is not None:
            raise ValueError(
                '`op` was given, but method="baseline" never grows; use method="custom".'
            )
        return GrowthSchedule((config.total_steps,), (), config.depth)
    lengths = so.prop_schedule(config.total_steps, config.stages, config.alpha)
    n = config.stages - 1
    if config.method == CUSTOM:
        if op is None:
            raise ValueError(
                'method="custom" needs its operator: train(config, run_dir, op=stackops.'
                "middle_stack(block=...)), or one operator per boundary."
            )
        ops = (op,) * n if isinstance(op, so.AbstractGrowth) else tuple(op)
        if len(ops) != n or not all(isinstance(o, so.AbstractGrowth) for o in ops):
            raise ValueError(
                f"`op` must be a stackops operator or a sequence of {n} of them (one per stage "
                f"boundary of a {config.stages}-stage run), got {op!r}."
            )
    else:
        if op is not None:
            raise ValueError(
                f"`op` was given, but config.method={config.method!r} chooses its own operator; "
                'set method="custom" to train with the given one.'
            )
        ops = (method_operator(config),) * n  # type: ignore[assignment]
    return GrowthSchedule(tuple(lengths), ops, config.block)  # type: ignore[arg-type]
