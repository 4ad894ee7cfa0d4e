"""Hypothesis strategies for growth operators."""

from __future__ import annotations

from hypothesis import strategies as st

import stackops as so


def _copying_op(draw, b: int):
    kind = draw(st.sampled_from(["middle", "middle_depth", "last", "interp", "interp_all"]))
    if kind == "middle":
        return so.middle_stack(block=b)
    if kind == "middle_depth":
        return so.middle_stack(block=b, align="depth")
    if kind == "last":
        return so.last_stack(block=b)
    t = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    return so.interpolate(block=b, t=t, at="all" if kind == "interp_all" else "middle")


@st.composite
def depth_and_op(draw, *, max_blocks: int = 3, max_block: int = 2, allow_map: bool = True):
    """A (depth, operator) pair: a single copying operator, a composition, or a layer_map."""
    b = draw(st.integers(1, max_block))
    n = draw(st.integers(1, max_blocks))
    depth = b * n
    form = draw(st.sampled_from(["one", "compose", "map"] if allow_map else ["one", "compose"]))
    if form == "one":
        return depth, _copying_op(draw, b)
    if form == "compose":
        return depth, so.compose(_copying_op(draw, b), _copying_op(draw, b))
    length = draw(st.integers(1, depth + 3))
    sources = draw(st.lists(st.integers(0, depth - 1), min_size=length, max_size=length))
    return depth, so.layer_map(sources)
