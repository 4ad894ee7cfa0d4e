"""Plans: what each layer of a grown stack is built from, independent of any arrays.

A plan maps a stack of `depth_in` *positions* to a stack of `depth_out` positions. It has two
parts:

- `layers`: the stored layers of the result. Each is either [`Keep`][stackops.Keep] (the
  stored layer that old position `i` runs, unchanged) or [`Mix`][stackops.Mix] (a new layer,
  `sum_k w_k * old[sources_k]`; a copy is a mix with one source and weight 1).
- `order`: for each new position, the index into `layers` of the layer it runs. Two positions
  with the same index share weights (a loop).

Plans compose ([`Plan.then`][stackops.Plan.then]); applying a plan is a gather along the
layer axis (a weighted sum only for mixes), done by [`stackops.grow`][].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Keep:
    """The stored layer run by old position `source`, kept bit-identical.

    !!! Example

        ```python
        import stackops as so

        plan = so.last_stack(block=1).plan(depth=2)
        assert plan.layers[0] == so.Keep(0)
        ```
    """

    source: int

    def __repr__(self) -> str:
        return f"keep({self.source})"


@dataclasses.dataclass(frozen=True)
class Mix:
    """A new layer: `sum(w * old[s] for s, w in zip(sources, weights))`.

    With one source and weight 1.0 this is a fresh copy of that layer.

    !!! Example

        ```python
        import stackops as so

        plan = so.interpolate(block=1, t=0.25).plan(depth=2)
        mix = plan.layers[plan.order[1]]
        assert mix == so.Mix((0, 1), (0.75, 0.25)) and not mix.is_copy
        ```
    """

    sources: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.sources) == 0 or len(self.sources) != len(self.weights):
            raise ValueError(
                f"Mix needs as many weights as sources (at least one); got sources={self.sources}"
                f" and weights={self.weights}."
            )
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(
                f"Mix weights must be finite numbers, got {self.weights}: a NaN or infinite "
                "weight would fill the new layer with NaN/inf."
            )

    @property
    def is_copy(self) -> bool:
        return len(self.sources) == 1 and self.weights[0] == 1.0

    def __repr__(self) -> str:
        if self.is_copy:
            return f"copy({self.sources[0]})"
        terms = " + ".join(f"{w:g}*{s}" for s, w in zip(self.sources, self.weights))
        return f"mix({terms})"


LayerSpec = Keep | Mix


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every layer of a grown stack is built from.

    **Attributes:**

    - `depth_in`: number of positions (layers run in sequence) before growth.
    - `layers`: the stored layers after growth, each a `Keep` or a `Mix` over old positions.
    - `order`: for each new position, the index in `layers` of the layer it runs.
    - `name`: the operator that made the plan (for display only).

    !!! Example

        ```python
        import stackops as so

        plan = so.middle_stack(block=1).plan(depth=3)
        print(plan)             # shows each new position and its source
        assert plan.depth_out == 4
        assert plan.sources() == (0, 1, 1, 2)
        ```
    """

    depth_in: int
    layers: tuple[LayerSpec, ...]
    order: tuple[int, ...]
    name: str = "plan"
    origin: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.depth_in, bool) or not isinstance(self.depth_in, (int, np.integer)):
            raise TypeError(f"Plan.depth_in must be an integer, got {self.depth_in!r}.")
        object.__setattr__(self, "depth_in", int(self.depth_in))
        object.__setattr__(self, "order", tuple(int(i) if isinstance(i, np.integer) else i
                                                for i in self.order))
        if self.depth_in < 1:
            raise ValueError(f"Plan.depth_in must be >= 1, got {self.depth_in}.")
        n = len(self.layers)
        if not self.order:
            raise ValueError("Plan.order is empty: a grown stack needs at least one position.")
        for i in self.order:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"Plan.order entries must be integers, got {i!r}.")
            if not 0 <= i < n:
                raise ValueError(f"Plan.order refers to layer {i}, but there are only {n} layers.")
        if self.origin is None:
            # By default a position continues the old position it keeps (first use only);
            # every other position is inserted.
            seen: set[int] = set()
            origin: list[int | None] = []
            for i in self.order:
                spec = self.layers[i]
                if isinstance(spec, Keep) and i not in seen:
                    origin.append(spec.source)
                else:
                    origin.append(None)
                seen.add(i)
            object.__setattr__(self, "origin", tuple(origin))
        elif len(self.origin) != len(self.order):
            raise ValueError("Plan.origin needs one entry per new position.")
        if set(self.order) != set(range(n)):
            unused = sorted(set(range(n)) - set(self.order))
            raise ValueError(f"Plan has stored layers {unused} that no position runs.")
        for spec in self.layers:
            srcs = (spec.source,) if isinstance(spec, Keep) else spec.sources
            for s in srcs:
                if not 0 <= s < self.depth_in:
                    raise ValueError(
                        f"Plan refers to old position {s}, but depth_in is {self.depth_in}."
                    )

    @property
    def depth_out(self) -> int:
        """Number of positions after growth."""
        return len(self.order)

    @property
    def num_layers(self) -> int:
        """Number of stored layers after growth (fewer than `depth_out` when tied)."""
        return len(self.layers)

    @property
    def is_tied(self) -> bool:
        """Whether two positions of the result share one stored layer."""
        return len(set(self.order)) != len(self.order)

    @property
    def inserted(self) -> tuple[int, ...]:
        """New positions that continue no old position (the ones `preserve` makes identities)."""
        return tuple(q for q, o in enumerate(self.origin or ()) if o is None)

    @property
    def new_layers(self) -> tuple[int, ...]:
        """Indices (into `layers`) of the layers that did not exist before (copies, mixes)."""
        return tuple(i for i, s in enumerate(self.layers) if isinstance(s, Mix))

    def sources(self) -> tuple[int, ...]:
        """For each new position, its main source position (largest weight)."""
        out = []
        for i in self.order:
            spec = self.layers[i]
            if isinstance(spec, Keep):
                out.append(spec.source)
            else:
                k = max(range(len(spec.weights)), key=lambda j: spec.weights[j])
                out.append(spec.sources[k])
        return tuple(out)

    def then(self, other: Plan) -> Plan:
        """The plan of applying `self`, then `other` (which must start at `self.depth_out`).

        !!! Example

            ```python
            import stackops as so

            a = so.middle_stack(block=1).plan(depth=2)
            b = so.last_stack(block=1).plan(depth=3)
            assert a.then(b).depth_out == 4
            ```
        """
        if other.depth_in != self.depth_out:
            raise ValueError(
                f"Cannot compose: the first plan ends at depth {self.depth_out} but the second "
                f"starts at depth {other.depth_in}."
            )
        # Each intermediate position runs stored layer self.order[j] of `self`.
        new_layers: list[LayerSpec] = []
        index: dict[object, int] = {}

        def intern(key: object, spec: LayerSpec) -> int:
            if key not in index:
                index[key] = len(new_layers)
                new_layers.append(spec)
            return index[key]

        other_to_new: dict[int, int] = {}
        for b_idx, spec in enumerate(other.layers):
            if isinstance(spec, Keep):
                a_idx = self.order[spec.source]
                # Keeping an intermediate layer keeps whatever `self` made for it; two kept
                # positions that shared a layer in `self` keep sharing it.
                other_to_new[b_idx] = intern(("a", a_idx), self.layers[a_idx])
            else:
                acc: dict[int, float] = {}
                for s, w in zip(spec.sources, spec.weights):
                    a_spec = self.layers[self.order[s]]
                    if isinstance(a_spec, Keep):
                        acc[a_spec.source] = acc.get(a_spec.source, 0.0) + w
                    else:
                        for s2, w2 in zip(a_spec.sources, a_spec.weights):
                            acc[s2] = acc.get(s2, 0.0) + w * w2
                srcs = tuple(acc)
                other_to_new[b_idx] = intern(("b", b_idx), Mix(srcs, tuple(acc[s] for s in srcs)))
        layers, order = _renumber(new_layers, [other_to_new[i] for i in other.order])
        assert self.origin is not None and other.origin is not None
        origin = tuple(None if o is None else self.origin[o] for o in other.origin)
        return Plan(
            self.depth_in, layers, order, name=f"{self.name} -> {other.name}", origin=origin
        )

    def __repr__(self) -> str:
        lines = [f"Plan[{self.name}]: depth {self.depth_in} -> {self.depth_out}"]
        if self.is_tied:
            lines[0] += f" ({self.num_layers} stored layers)"
        seen: set[int] = set()
        for pos, i in enumerate(self.order):
            spec = self.layers[i]
            tag = ""
            if i in seen:
                tag = f"  tied to layer {i}"
            elif isinstance(spec, Mix):
                tag = "  new"
            if self.origin is not None and self.origin[pos] is None:
                tag += " (inserted)"
            seen.add(i)
            lines.append(f"  {pos:>3}: {spec!r}{tag}")
        return "\n".join(lines)

    __str__ = __repr__


def plan_from_sources(
    depth_in: int,
    sources: Sequence[int | Sequence[tuple[int, float]]],
    *,
    tie: bool,
    name: str,
    origin: tuple[int | None, ...] | None = None,
) -> Plan:
    """Build a plan from one source spec per new position.

    An `int` is a layer: the first position naming old position `i` keeps it, later ones copy
    it (or, with `tie=True`, run the same stored layer). A sequence of `(source, weight)` pairs
    is a new mixed layer.
    """
    layers: list[LayerSpec] = []
    order: list[int] = []
    kept: dict[int, int] = {}
    for pos, src in enumerate(sources):
        if isinstance(src, (int,)) and not isinstance(src, bool):
            if not 0 <= src < depth_in:
                raise ValueError(
                    f"sources[{pos}] = {src} is out of range for a stack of depth {depth_in}: use "
                    f"an index in 0..{depth_in - 1}."
                )
            if src in kept and tie:
                order.append(kept[src])
            elif src in kept:
                layers.append(Mix((src,), (1.0,)))
                order.append(len(layers) - 1)
            else:
                layers.append(Keep(src))
                kept[src] = len(layers) - 1
                order.append(kept[src])
        else:
            try:
                pairs = [(int(s), float(w)) for s, w in src]  # type: ignore[union-attr]
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"sources[{pos}] must be an int or a sequence of (index, weight) pairs, "
                    f"got {src!r}."
                ) from e
            if not pairs:
                raise ValueError(f"sources[{pos}] is an empty mix: give at least one pair.")
            for s, _ in pairs:
                if not 0 <= s < depth_in:
                    raise ValueError(
                        f"sources[{pos}] mixes layer {s}, out of range for depth {depth_in}."
                    )
            layers.append(Mix(tuple(s for s, _ in pairs), tuple(w for _, w in pairs)))
            order.append(len(layers) - 1)
    if not order:
        raise ValueError("sources is empty: a grown stack needs at least one layer.")
    # A kept layer dropped from the result is allowed (the plan just does not keep it).
    new_layers, new_order = _renumber(layers, order)
    return Plan(depth_in, new_layers, new_order, name=name, origin=origin)


def _renumber(
    layers: Sequence[LayerSpec], order: Sequence[int]
) -> tuple[tuple[LayerSpec, ...], tuple[int, ...]]:
    """Number stored layers in order of first use (so an untied plan runs them in order),
    dropping layers no position uses."""
    first_use: dict[int, int] = {}
    for i in order:
        first_use.setdefault(i, len(first_use))
    renumbered: list[LayerSpec] = [layers[0]] * len(first_use)
    for old, new in first_use.items():
        renumbered[new] = layers[old]
    return tuple(renumbered), tuple(first_use[i] for i in order)


def resolve(
    plan: Plan, order_in: Sequence[int] | None
) -> tuple[list[int | tuple[tuple[int, ...], tuple[float, ...]]], tuple[int, ...]]:
    """Turn a plan over positions into one over *stored* layers.

    `order_in[p]` is the stored layer that old position `p` runs (`None`: position `p` runs
    stored layer `p`). Returns `(specs, order_out)`: each spec is either an `int` (keep that
    old stored layer) or `(sources, weights)` over old stored layers, and `order_out[q]` is
    the index into `specs` run by new position `q`. Kept positions that shared a stored layer
    before still share it after: ties survive growth.
    """
    if order_in is None:
        order_in = tuple(range(plan.depth_in))
    if len(order_in) != plan.depth_in:
        raise ValueError(
            f"The plan was made for depth {plan.depth_in} but the stack has {len(order_in)} "
            "positions: make the plan for the stack's depth."
        )
    key_of_layer: list[object] = []
    for i, spec in enumerate(plan.layers):
        if isinstance(spec, Keep):
            key_of_layer.append(("old", order_in[spec.source]))
        else:
            key_of_layer.append(("new", i))
    first_use: dict[object, int] = {}
    specs: list[int | tuple[tuple[int, ...], tuple[float, ...]]] = []
    order_out = []
    for i in plan.order:
        key = key_of_layer[i]
        if key not in first_use:
            first_use[key] = len(specs)
            spec = plan.layers[i]
            if isinstance(spec, Keep):
                specs.append(order_in[spec.source])
            else:
                specs.append((tuple(order_in[s] for s in spec.sources), spec.weights))
        order_out.append(first_use[key])
    return specs, tuple(order_out)
