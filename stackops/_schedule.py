"""Stage schedules: Prop-α stage lengths, the stage at a step, and ideal speedups."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["prop_schedule", "stage_at", "stage_starts", "ideal_speedup", "schedule_speedup"]


def _check_alpha(alpha: float) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"`alpha` must be a number >= 0, got {alpha!r}.") from None
    if not alpha >= 0.0:  # also rejects NaN
        raise ValueError(f"`alpha` must be >= 0 (0 gives equal stages), got {alpha}.")
    if math.isinf(alpha):
        raise ValueError(
            "`alpha` must be finite; a very large alpha gives (almost) every step to the last "
            "stage, e.g. alpha=100."
        )
    return alpha


def _check_int(x: object, name: str, minimum: int) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {what}, got {x!r}.")
    return int(x)


def _weights(stages: int, alpha: float) -> list[float]:
    """`(i / k)^alpha` for i = 1..k: proportional to `i^alpha`, and never overflowing."""
    return [math.exp(alpha * (math.log(i + 1) - math.log(stages))) for i in range(stages)]


def prop_schedule(total_steps: int, stages: int, alpha: float = 1.0) -> tuple[int, ...]:
    """Prop-α stage lengths: stage `i` of `k` gets `T_i ∝ i^α` steps, summing to `total_steps`.

    Lengths are rounded by largest remainder, and every stage gets at least one step.

    **Arguments:**

    - `total_steps`: the whole budget `T` (an integer >= `stages`).
    - `stages`: the number of stages `k` (>= 1).
    - `alpha`: the exponent α >= 0 (the paper uses 1, 2 and 3; 0 gives equal stages).

    **Returns:** a tuple of `stages` positive integers summing to `total_steps`.

    !!! Example

        ```python
        import stackops as so

        assert so.prop_schedule(210, 6, alpha=1) == (10, 20, 30, 40, 50, 60)
        ```
    """
    stages = _check_int(stages, "stages", 1)
    total_steps = _check_int(total_steps, "total_steps", 1)
    if stages > total_steps:
        raise ValueError(
            f"prop_schedule: {stages} stages need at least {stages} steps, but total_steps is "
            f"{total_steps}: use fewer stages or more steps."
        )
    alpha = _check_alpha(alpha)
    w = _weights(stages, alpha)
    z = math.fsum(w)
    exact = [total_steps * x / z for x in w]
    lengths = [int(e) for e in exact]
    rest = total_steps - sum(lengths)
    by_frac = sorted(range(stages), key=lambda i: (-(exact[i] - lengths[i]), -i))
    for i in by_frac[:rest]:
        lengths[i] += 1
    # Every stage trains at least one step: take from the longest stages (a heap keeps this
    # O(k log k) however many stages are empty).
    empty = [i for i in range(stages) if lengths[i] == 0]
    if empty:
        heap = [(-n, -j) for j, n in enumerate(lengths) if n > 1]
        heapq.heapify(heap)
        for i in empty:
            n, j = heapq.heappop(heap)
            lengths[-j] -= 1
            lengths[i] += 1
            if -n - 1 > 1:
                heapq.heappush(heap, (n + 1, j))
    return tuple(lengths)


def stage_starts(schedule: Sequence[int]) -> tuple[int, ...]:
    """The global step at which each stage starts (the first is 0).

    !!! Example

        ```python
        import stackops as so

        assert so.stage_starts((10, 20, 30)) == (0, 10, 30)
        ```
    """
    starts, acc = [], 0
    for n in schedule:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"`schedule` lengths must be positive, got {tuple(schedule)}.")
        starts.append(acc)
        acc += n
    return tuple(starts)


def stage_at(step: int, schedule: Sequence[int]) -> int:
    """The 0-based stage that global step `step` belongs to.

    Steps past the end of the schedule belong to the last stage.

    !!! Example

        ```python
        import stackops as so

        sched = so.prop_schedule(60, 3)   # (10, 20, 30)
        assert [so.stage_at(s, sched) for s in (0, 9, 10, 29, 30, 59)] == [0, 0, 1, 1, 2, 2]
        ```
    """
    step = _check_int(step, "step", 0)
    if len(schedule) == 0:
        raise ValueError("stage_at: `schedule` is empty; it needs at least one stage length.")
    starts = stage_starts(schedule)
    return bisect.bisect_right(starts, step) - 1


def ideal_speedup(stages: int, alpha: float = 1.0) -> float:
    """Compute saved by Prop-α stacking when a step costs in proportion to depth.

    `k·Σ i^α / Σ i^(α+1)`: the cost of training the final depth for all steps over the cost of
    the stagewise run.

    !!! Example

        ```python
        import stackops as so

        assert round(so.ideal_speedup(6, alpha=1), 3) == 1.385
        ```
    """
    stages = _check_int(stages, "stages", 1)
    alpha = _check_alpha(alpha)
    w = _weights(stages, alpha)  # i^alpha / k^alpha: the common factor cancels
    num = stages * math.fsum(w)
    den = math.fsum(x * (i + 1) for i, x in enumerate(w))
    return num / den


def schedule_speedup(schedule: Sequence[int], step_cost: Callable[[int], float]) -> float:
    """Speedup of a concrete schedule under a cost model that may include fixed costs.

    `step_cost(i)` is the cost of one step in stage `i` (0-based); the last stage's cost is
    the baseline's. Include the embedding and head in `step_cost` to get the realistic figure.

    !!! Example

        ```python
        import stackops as so

        sched = so.prop_schedule(210, 6)
        assert abs(so.schedule_speedup(sched, lambda i: i + 1) - so.ideal_speedup(6)) < 1e-9
        ```
    """
    if not schedule:
        raise ValueError("`schedule` is empty.")
    stage_starts(schedule)
    total = sum(schedule)
    base = total * step_cost(len(schedule) - 1)
    grown = sum(n * step_cost(i) for i, n in enumerate(schedule))
    return base / grown
