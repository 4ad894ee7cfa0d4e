"""Prop-α schedules and speedups."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stackops as so


@given(st.integers(1, 10_000), st.integers(1, 12), st.floats(0, 4))
def test_prop_schedule_sums_to_total_and_is_proportional(total, stages, alpha):
    if stages > total:
        with pytest.raises(ValueError):
            so.prop_schedule(total, stages, alpha)
        return
    sched = so.prop_schedule(total, stages, alpha)
    assert len(sched) == stages and sum(sched) == total and min(sched) >= 1
    z = sum((i + 1) ** alpha for i in range(stages))
    for i, n in enumerate(sched):
        exact = total * (i + 1) ** alpha / z
        assert abs(n - exact) < 1 + stages  # rounding (plus the at-least-one-step rule)


@pytest.mark.parametrize("alpha,expected", [(1, 1.385), (2, 1.238), (3, 1.163)])
def test_ideal_speedup_matches_the_paper_for_six_stages(alpha, expected):
    assert round(so.ideal_speedup(6, alpha), 3) == expected


def test_stage_at_and_starts():
    sched = so.prop_schedule(210, 6, 1)
    assert sched == (10, 20, 30, 40, 50, 60)
    starts = so.stage_starts(sched)
    assert starts == (0, 10, 30, 60, 100, 150)
    for i, s in enumerate(starts):
        assert so.stage_at(s, sched) == i
        if s:
            assert so.stage_at(s - 1, sched) == i - 1
    assert so.stage_at(10_000, sched) == 5


def test_schedule_speedup_with_fixed_costs_is_below_the_ideal():
    sched = so.prop_schedule(630, 6, 1)  # 630 = 30 * 21: exact Prop-1 lengths
    ideal = so.schedule_speedup(sched, lambda i: i + 1)
    assert math.isclose(ideal, so.ideal_speedup(6, 1), rel_tol=1e-12)
    with_head = so.schedule_speedup(sched, lambda i: (i + 1) + 2.0)  # embedding/head cost
    assert 1.0 < with_head < ideal
