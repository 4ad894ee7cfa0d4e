"""Growth operators. Each one only makes plans; it never touches arrays."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from ._plan import Plan, plan_from_sources, resolve

__all__ = [
    "AbstractGrowth",
    "middle_stack",
    "last_stack",
    "loop_tie",
    "untie",
    "interpolate",
    "layer_map",
    "compose",
]


def _check_block(block: object, name: str = "block") -> int:
    is_int = isinstance(block, (int, np.integer)) and not isinstance(block, (bool, np.bool_))
    if not is_int or block <= 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be a positive integer (layers per block), got {block!r}.")
    return int(block)  # type: ignore[call-overload]


def _check_depth(depth: object) -> int:
    if isinstance(depth, (bool, np.bool_)) or not isinstance(depth, (int, np.integer)):
        raise TypeError(f"`depth` must be an integer (the number of positions), got {depth!r}.")
    if depth < 1:
        raise ValueError(f"`depth` must be >= 1, got {depth}.")
    return int(depth)


def _entry(pos: int, s: object) -> int | tuple[tuple[int, float], ...]:
    """One `layer_map` entry: an index, or a sequence of (index, weight) pairs."""
    if isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)):
        return int(s)
    if isinstance(s, (str, bytes, float, bool, np.floating, np.bool_)) or not hasattr(
        s, "__iter__"
    ):
        raise TypeError(
            f"layer_map: sources[{pos}] must be an int (a position) or a sequence of "
            f"(position, weight) pairs, got {s!r}."
        )
    pairs = []
    for pair in s:  # type: ignore[attr-defined]
        try:
            i, w = pair
        except (TypeError, ValueError):
            raise TypeError(
                f"layer_map: sources[{pos}] must be a sequence of (position, weight) pairs; "
                f"{pair!r} is not a pair."
            ) from None
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(
                f"layer_map: sources[{pos}] has position {i!r}; positions must be integers."
            )
        try:
            wf = float(w)
        except (TypeError, ValueError):
            raise TypeError(
                f"layer_map: sources[{pos}] has weight {w!r}; weights must be real numbers."
            ) from None
        pairs.append((int(i), wf))
    return tuple(pairs)


def _num_blocks(depth: int, block: int, op: str) -> int:
    depth = _check_depth(depth)
    if block > depth:
        raise ValueError(
            f"{op}: block={block} is larger than the stack's depth {depth}: use a block of at "
            f"most {depth} layers."
        )
    if depth % block:
        raise ValueError(
            f"{op}: depth {depth} is not divisible by block={block}: use a block size that "
            f"divides the depth (e.g. {math.gcd(depth, block)})."
        )
    return depth // block


class AbstractGrowth(abc.ABC):
    """A depth-growth operator: given a stack's depth, it makes a [`stackops.Plan`][].

    Subclasses implement `plan`. Operators are cheap, immutable and hashable by value, so they
    can be closed over inside `jax.jit`.

    !!! Example

        ```python
        import stackops as so

        class reverse(so.AbstractGrowth):
            # Run the layers in reverse order (a toy operator).


            def plan(self, depth, *, order=None):
                return so.layer_map(list(range(depth))[::-1], name="reverse").plan(depth)

        assert reverse().plan(3).sources() == (2, 1, 0)
        ```
    """

    @abc.abstractmethod
    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        """The plan for a stack of `depth` positions.

        **Arguments:**

        - `depth`: the number of positions (layers run in sequence) of the stack.
        - `order`: for a stack with tied positions, the stored layer each position runs
          (`Stack.order`); `None` for an untied stack.
        """

    def __call__(self, depth: int) -> Plan:
        return self.plan(depth)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items(), key=str).__repr__())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class middle_stack(AbstractGrowth):
    """MIDAS: copy the middle block and insert the copy next to it.

    With `n` blocks of `block` layers, block `m = ceil(n/2)` (1-based) is copied and the copy
    is inserted right after it: `[B1..Bm, Bm', Bm+1..Bn]`. After six stages from one block the
    blocks' birth stages read `[1, 3, 5, 6, 4, 2]`.

    **Arguments:**

    - `block`: layers per block (positive; must divide the depth).
    - `align`: `"block"` (default, the MIDAS rule) or `"depth"`: copy the `block` layers
      centred on the middle of the depth (the last half of one block and the first half of
      the next, LIDAS-style) and insert the copies after them.

    !!! Example

        ```python
        import stackops as so

        plan = so.middle_stack(block=2).plan(depth=6)  # blocks B1 B2 B3 -> copy B2
        assert plan.sources() == (0, 1, 2, 3, 2, 3, 4, 5)
        ```
    """

    def __init__(self, block: int = 1, *, align: Literal["block", "depth"] = "block"):
        self.block = _check_block(block)
        if align not in ("block", "depth"):
            raise ValueError(f'`align` must be "block" or "depth", got {align!r}.')
        self.align = align

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        b = self.block
        n = _num_blocks(depth, b, "middle_stack")
        if self.align == "block":
            m = math.ceil(n / 2)
            start, stop = (m - 1) * b, m * b
        else:
            start = depth // 2 - b // 2
            stop = start + b
        src = [*range(stop), *range(start, stop), *range(stop, depth)]
        return plan_from_sources(depth, src, tie=False, name=f"middle_stack(block={b})")


class last_stack(AbstractGrowth):
    """Gradual stacking (GradStack): copy the last block on top, `[B1..Bn, Bn']`.

    **Arguments:**

    - `block`: layers per block (positive; must divide the depth).

    !!! Example

        ```python
        import stackops as so

        assert so.last_stack(block=2).plan(depth=4).sources() == (0, 1, 2, 3, 2, 3)
        ```
    """

    def __init__(self, block: int = 1):
        self.block = _check_block(block)

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        b = self.block
        _num_blocks(depth, b, "last_stack")
        src = [*range(depth), *range(depth - b, depth)]
        return plan_from_sources(depth, src, tie=False, name=f"last_stack(block={b})")


class loop_tie(AbstractGrowth):
    """Tie a block into a loop: the middle block runs `repeats` times with one set of weights.

    By default it mirrors [`stackops.middle_stack`][]: `loop_tie(block=b)` followed by
    [`stackops.untie`][] gives exactly `middle_stack(block=b)`. Applied to a one-block stack
    it builds a looped model `(block ⊗ repeats)`. Tying needs a [`stackops.Stack`][]; the
    gradient of a tied layer is the sum over the positions that run it.

    **Arguments:**

    - `block`: layers per block (positive; must divide the depth).
    - `repeats`: how many times the block runs in total (>= 1; 2 mirrors one MIDAS stage).
    - `at`: which block loops: `"middle"` (block `ceil(n/2)`, default) or `"last"`.

    !!! Example

        ```python
        import stackops as so

        plan = so.loop_tie(block=1, repeats=3).plan(depth=1)
        assert plan.depth_out == 3 and plan.num_layers == 1
        ```
    """

    def __init__(
        self, block: int = 1, repeats: int = 2, *, at: Literal["middle", "last"] = "middle"
    ):
        self.block = _check_block(block)
        if (
            isinstance(repeats, (bool, np.bool_))
            or not isinstance(repeats, (int, np.integer))
            or repeats < 1
        ):
            raise ValueError(f"`repeats` must be an integer >= 1, got {repeats!r}.")
        repeats = int(repeats)
        if at not in ("middle", "last"):
            raise ValueError(f'`at` must be "middle" or "last", got {at!r}.')
        self.repeats = repeats
        self.at = at

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        b = self.block
        n = _num_blocks(depth, b, "loop_tie")
        m = math.ceil(n / 2) if self.at == "middle" else n
        start, stop = (m - 1) * b, m * b
        src = [*range(stop), *(list(range(start, stop)) * (self.repeats - 1)), *range(stop, depth)]
        return plan_from_sources(
            depth, src, tie=True, name=f"loop_tie(block={b}, repeats={self.repeats})"
        )


class untie(AbstractGrowth):
    """Materialise tied positions: every position gets its own copy of the layer it runs.

    The first position running a stored layer keeps it; later ones get fresh copies. On an
    untied stack this is the identity.

    !!! Example

        ```python
        import stackops as so

        tied = so.loop_tie(block=1).plan(depth=3)           # 4 positions, 3 stored layers
        plan = so.untie().plan(depth=4, order=tied.order)
        assert plan.num_layers == 4 and not plan.is_tied
        ```
    """

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        depth = _check_depth(depth)
        if order is None:
            order = range(depth)
        if len(order) != depth:
            raise ValueError(f"untie: `order` has {len(order)} entries but depth is {depth}.")
        seen: set[int] = set()
        src: list[int | Sequence[tuple[int, float]]] = []
        for p, s in enumerate(order):
            src.append(p if s not in seen else [(p, 1.0)])
            seen.add(s)
        # Untying inserts nothing: every position continues itself.
        return plan_from_sources(depth, src, tie=False, name="untie()", origin=tuple(range(depth)))


class interpolate(AbstractGrowth):
    """Insert new blocks initialised as convex mixes of their neighbouring blocks.

    Layer `j` of a block inserted between blocks `A` and `B` is `(1 - t) * A[j] + t * B[j]`;
    `t=0` is a copy of `A`, `t=1` a copy of `B`. Where there is no right neighbour (a
    one-block stack) the new block is a copy.

    **Arguments:**

    - `block`: layers per block (positive; must divide the depth).
    - `t`: the mixing weight in `[0, 1]`.
    - `at`: `"middle"` inserts one block after block `ceil(n/2)` (the MIDAS position);
      `"all"` inserts one between every pair of adjacent blocks (`n -> 2n - 1`).

    !!! Example

        ```python
        import stackops as so

        plan = so.interpolate(block=1, t=0.5).plan(depth=2)
        print(plan)  # position 1 is mix(0.5*0 + 0.5*1)
        assert plan.depth_out == 3
        ```
    """

    def __init__(self, block: int = 1, t: float = 0.5, *, at: Literal["middle", "all"] = "middle"):
        self.block = _check_block(block)
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise ValueError(f"`t` must be a number in [0, 1], got {t!r}.") from None
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"`t` must be in [0, 1], got {t}.")
        if at not in ("middle", "all"):
            raise ValueError(f'`at` must be "middle" or "all", got {at!r}.')
        self.t = t
        self.at = at

    def _new_block(self, a: int, b_: int | None) -> list[Sequence[tuple[int, float]]]:
        b = self.block
        out: list[Sequence[tuple[int, float]]] = []
        for j in range(b):
            pairs = [(a * b + j, 1.0 - self.t)]
            if b_ is not None:
                pairs.append((b_ * b + j, self.t))
            else:
                pairs = [(a * b + j, 1.0)]
            pairs = [(s, w) for s, w in pairs if w != 0.0]
            out.append(pairs)
        return out

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        b = self.block
        n = _num_blocks(depth, b, "interpolate")
        blocks = [list(range(i * b, (i + 1) * b)) for i in range(n)]
        src: list[int | Sequence[tuple[int, float]]] = []
        if self.at == "middle":
            m = math.ceil(n / 2) - 1  # 0-based
            for i in range(n):
                src += blocks[i]
                if i == m:
                    src += self._new_block(m, m + 1 if m + 1 < n else None)
        else:
            for i in range(n):
                src += blocks[i]
                if i + 1 < n:
                    src += self._new_block(i, i + 1)
            if n == 1:
                src += self._new_block(0, None)
        return plan_from_sources(
            depth, src, tie=False, name=f"interpolate(block={b}, t={self.t:g}, at={self.at!r})"
        )


class layer_map(AbstractGrowth):
    """A general operator from an explicit list of sources, one per new position.

    Each entry is an old position (`int`) or a mix, a list of `(position, weight)` pairs. The
    first position naming an old layer keeps it; later ones copy it, or with `tie=True` run
    the same stored layer. `sources` may be a function of the depth. This writes Gstack
    (tile the whole model `g` times), LLaMA Pro interleaving or a mergekit-style slice list in
    one line.

    **Arguments:**

    - `sources`: a sequence of entries, or a callable `depth -> sequence`.
    - `tie`: run repeated layers with shared weights instead of copies (needs a `Stack`).
    - `name`: a label for the plan's repr.

    !!! Example

        ```python
        import stackops as so

        gstack = so.layer_map(lambda n: [*range(n)] * 4, name="gstack(4)")   # tile 4 times
        assert gstack.plan(depth=2).sources() == (0, 1, 0, 1, 0, 1, 0, 1)
        ```
    """

    def __init__(
        self,
        sources: Sequence[int | Sequence[tuple[int, float]]]
        | Callable[[int], Sequence[int | Sequence[tuple[int, float]]]],
        *,
        tie: bool = False,
        name: str | None = None,
    ):
        if not callable(sources):
            if isinstance(sources, (str, bytes)) or not hasattr(sources, "__iter__"):
                raise TypeError(
                    "layer_map: `sources` must be a sequence of entries (positions or mixes) or "
                    f"a function of the depth, got {sources!r}."
                )
            sources = tuple(_entry(p, s) for p, s in enumerate(sources))
        self.sources = sources
        self.tie = bool(tie)
        self.name = name

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        depth = _check_depth(depth)
        src = self.sources(depth) if callable(self.sources) else self.sources
        src = [_entry(p, s) for p, s in enumerate(src)]
        return plan_from_sources(
            depth, list(src), tie=self.tie, name=self.name or f"layer_map(tie={self.tie})"
        )


class compose(AbstractGrowth):
    """Several operators as one: `compose(a, b)` applies `a`, then `b`.

    Its plan is the product of the plans, so `grow(grow(m, a), b) == grow(m, compose(a, b))`.

    !!! Example

        ```python
        import stackops as so

        two_stages = so.compose(so.middle_stack(block=1), so.middle_stack(block=1))
        assert two_stages.plan(depth=1).depth_out == 3
        ```
    """

    def __init__(self, *ops: AbstractGrowth):
        if not ops:
            raise ValueError("compose() needs at least one operator.")
        for i, op in enumerate(ops):
            if not isinstance(op, AbstractGrowth):
                raise TypeError(
                    f"compose: argument {i} is {op!r}, not a growth operator (e.g. "
                    "stackops.middle_stack(block=2))."
                )
        self.ops = tuple(ops)

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        depth = _check_depth(depth)
        plan = self.ops[0].plan(depth, order=order)
        cur_order = resolve(plan, order)[1]
        for op in self.ops[1:]:
            nxt = op.plan(plan.depth_out, order=cur_order)
            cur_order = resolve(nxt, cur_order)[1]
            plan = plan.then(nxt)
        return plan

    def __repr__(self) -> str:
        return "compose(" + ", ".join(map(repr, self.ops)) + ")"
