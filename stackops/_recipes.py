"""Published depth up-scaling recipes, each a growth operator: LLaMA Pro, SOLAR, Gstack."""

from __future__ import annotations

from collections.abc import Sequence

from ._ops import AbstractGrowth, layer_map
from ._plan import Plan

__all__ = ["llama_pro", "solar", "gstack"]


def _positive(value: object, name: str, op: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: `{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


class llama_pro(AbstractGrowth):
    """LLaMA Pro block expansion: after every `every` layers, insert a copy of the last one.

    A stack of `n` layers gets `n // every` new layers: layer `j` is followed by its copy
    when `(j + 1) % every == 0`, exactly the placement of LLaMA Pro's `block_expansion.py`
    (32 layers, `every=4`: 40 layers). Grown with `preserve=True` each copy becomes an
    identity (its attention and MLP output projections zeroed), so the expanded model
    computes the original function, and only the new layers are then trained (see
    [`stackops.trainable_mask`][]).

    **Arguments:**

    - `every`: layers between two insertions (a positive integer, at most the depth).

    !!! Example

        ```python
        import stackops as so

        plan = so.llama_pro(every=2).plan(depth=4)
        assert plan.sources() == (0, 1, 1, 2, 3, 3)
        assert plan.inserted == (2, 5)      # the identity blocks under preserve=True
        ```
    """

    def __init__(self, every: int):
        self.every = _positive(every, "every", "llama_pro")

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        if self.every > depth:
            raise ValueError(
                f"llama_pro: every={self.every} is larger than the depth {depth}: nothing would "
                f"be inserted; use every <= {depth}."
            )
        src: list[int] = []
        for j in range(depth):
            src.append(j)
            if (j + 1) % self.every == 0:
                src.append(j)
        return layer_map(src, name=f"llama_pro(every={self.every})").plan(depth)


class solar(AbstractGrowth):
    """SOLAR depth up-scaling: two overlapping slices, `[0, n - drop)` then `[drop, n)`.

    The model is duplicated, the last `drop` layers of the first copy and the first `drop`
    layers of the second are dropped, and the two are stacked: `n -> 2 (n - drop)` (SOLAR
    10.7B: 32 layers, `drop=8`, 48 layers). The same as mergekit's passthrough config with
    `layer_range: [0, n - drop]` and `[drop, n]`.

    **Arguments:**

    - `drop`: layers dropped from each copy (`1 <= drop < n`).

    !!! Example

        ```python
        import stackops as so

        assert so.solar(drop=1).plan(depth=4).sources() == (0, 1, 2, 1, 2, 3)
        assert so.solar(drop=8).plan(depth=32).depth_out == 48
        ```
    """

    def __init__(self, drop: int):
        self.drop = _positive(drop, "drop", "solar")

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        if self.drop >= depth:
            raise ValueError(
                f"solar: drop={self.drop} must be smaller than the depth {depth} (each copy keeps "
                f"depth - drop layers)."
            )
        src = [*range(depth - self.drop), *range(self.drop, depth)]
        return layer_map(src, name=f"solar(drop={self.drop})").plan(depth)


class gstack(AbstractGrowth):
    """Gstack: tile the whole stack `times` times, `[L1..Ln, L1..Ln, ...]`.

    The depthwise stacking of "Stacking Your Transformers" (Du et al., 2024): a small
    model's layers repeated to make the large model's initialisation (`n -> times * n`).

    **Arguments:**

    - `times`: how many copies of the stack (>= 2).

    !!! Example

        ```python
        import stackops as so

        assert so.gstack(times=3).plan(depth=2).sources() == (0, 1, 0, 1, 0, 1)
        ```
    """

    def __init__(self, times: int):
        self.times = _positive(times, "times", "gstack", minimum=2)

    def plan(self, depth: int, *, order: Sequence[int] | None = None) -> Plan:
        if depth < 1:
            raise ValueError(f"gstack: depth must be >= 1, got {depth}.")
        return layer_map([*range(depth)] * self.times, name=f"gstack(times={self.times})").plan(
            depth
        )
