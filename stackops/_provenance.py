"""Provenance of a grown model: which layers are new, built from which, by which operator."""

from __future__ import annotations

from typing import Any

from ._plan import Keep, Plan

__all__ = ["provenance", "PROVENANCE_FORMAT"]

PROVENANCE_FORMAT = "stackops.provenance/1"


def provenance(
    plan: Plan, *, op: Any = None, preserve: bool = False, source: str | None = None
) -> dict[str, Any]:
    """A JSON-able record of how a grown stack was built, one entry per new position.

    Each entry of `layers` has the new `position`, its `kind` (`"kept"`: an old layer
    unchanged; `"copy"`; `"mix"`: a weighted sum; `"tied"`: runs the stored layer of an
    earlier position), `from` (old positions) and `weights`, `inserted` (continues no old
    position) and `identity` (an inserted layer made an identity under `preserve`).

    **Arguments:**

    - `plan`: the applied plan.
    - `op`: the operator (its `repr` is recorded; default: the plan's name).
    - `preserve`: whether growth was function-preserving.
    - `source`: where the original model came from (a path or name), or `None`.

    **Returns:** a dict with `format`, `operator`, `depth_in`, `depth_out`, `preserve`,
    `source`, `inserted` (positions) and `layers`.

    !!! Example

        ```python
        import json
        import stackops as so

        rec = so.provenance(so.llama_pro(every=2).plan(depth=2), preserve=True)
        assert rec["inserted"] == [2] and rec["layers"][2]["from"] == [1]
        assert rec["layers"][2]["identity"] and rec["layers"][0]["kind"] == "kept"
        json.dumps(rec)   # plain JSON
        ```
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"provenance: `plan` must be a stackops.Plan, got {plan!r}.")
    inserted = set(plan.inserted)
    seen: set[int] = set()
    layers = []
    for q, i in enumerate(plan.order):
        spec = plan.layers[i]
        if i in seen:
            kind = "tied"
        elif isinstance(spec, Keep):
            kind = "kept"
        else:
            kind = "copy" if spec.is_copy else "mix"
        seen.add(i)
        srcs = [spec.source] if isinstance(spec, Keep) else list(spec.sources)
        weights = [1.0] if isinstance(spec, Keep) else list(spec.weights)
        layers.append({
            "position": q,
            "kind": kind,
            "from": srcs,
            "weights": weights,
            "inserted": q in inserted,
            "identity": bool(preserve) and q in inserted,
        })
    return {
        "format": PROVENANCE_FORMAT,
        "operator": plan.name if op is None else repr(op),
        "depth_in": plan.depth_in,
        "depth_out": plan.depth_out,
        "preserve": bool(preserve),
        "source": source,
        "inserted": sorted(inserted),
        "layers": layers,
    }
