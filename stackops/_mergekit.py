"""mergekit passthrough configs (`slices:` of `layer_range`s) to and from growth operators."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._ops import AbstractGrowth, layer_map
from ._plan import Keep, Mix, Plan

__all__ = ["from_mergekit", "to_mergekit"]

_TOP_KEYS = {"slices", "merge_method", "dtype", "tokenizer_source", "base_model"}


def _load(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    if isinstance(config, os.PathLike) or (isinstance(config, str) and "\n" not in config
                                           and config.strip().endswith((".yml", ".yaml"))):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"from_mergekit: no config file at {str(config)!r}.")
        config = path.read_text()
    if not isinstance(config, str):
        raise TypeError(
            "from_mergekit: `config` must be a mapping, YAML text or a path to a .yml file, got "
            f"{type(config).__name__}."
        )
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml comes with the `hf` extra
        raise ImportError(
            "from_mergekit: reading YAML needs PyYAML: `pip install stackops[hf]` (or pass the "
            "config as a dict)."
        ) from e
    loaded = yaml.safe_load(config)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"from_mergekit: the YAML must be a mapping, got {loaded!r}.")
    return loaded


def from_mergekit(config: Mapping[str, Any] | str | os.PathLike) -> layer_map:
    """The growth operator of a mergekit passthrough config (`slices:` of `layer_range`s).

    Each slice names one model and a half-open `layer_range: [start, end]`; the result runs
    the slices' layers in order. mergekit's SOLAR-style up-scaling becomes a
    [`stackops.layer_map`][]: the first use of a layer keeps it, later uses copy it. Only
    `merge_method: passthrough` with one source per slice and one model throughout is a
    depth-growth operator; anything else (merges of several models, per-tensor
    `parameters`) is refused with the reason.

    **Arguments:**

    - `config`: the parsed config (a mapping), its YAML text, or a path to a `.yml` file
      (YAML needs PyYAML, in the `hf` extra).

    **Returns:** a `layer_map` (its `plan(depth)` checks the ranges against the depth).

    !!! Example

        ```python
        import stackops as so

        op = so.from_mergekit({
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "base", "layer_range": [0, 3]}]},
                {"sources": [{"model": "base", "layer_range": [1, 4]}]},
            ],
        })
        assert op.plan(depth=4).sources() == so.solar(drop=1).plan(depth=4).sources()
        ```
    """
    cfg = _load(config)
    unknown = set(cfg) - _TOP_KEYS
    if unknown:
        raise ValueError(f"from_mergekit: unsupported top-level keys {sorted(unknown)} (read: "
                         f"{sorted(_TOP_KEYS)}).")
    method = cfg.get("merge_method", "passthrough")
    if method != "passthrough":
        raise ValueError(
            f"from_mergekit: merge_method={method!r} merges models; only passthrough (slices of "
            "one model) is a depth-growth operator."
        )
    slices = cfg.get("slices")
    if not isinstance(slices, list) or not slices:
        raise ValueError("from_mergekit: the config needs a non-empty `slices:` list.")
    models: set[str] = set()
    src: list[int] = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, Mapping) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise ValueError(
                f"from_mergekit: slice {i} must have exactly one source (passthrough), got "
                f"{sources!r}."
            )
        s = sources[0]
        extra = set(s) - {"model", "layer_range"} if isinstance(s, Mapping) else {"?"}
        if extra or set(sl) - {"sources"}:
            raise ValueError(
                f"from_mergekit: slice {i} has keys stackops cannot express "
                f"({sorted(extra | (set(sl) - {'sources'}))}): only `model` and `layer_range`."
            )
        rng = s.get("layer_range")
        if (
            not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
            or not 0 <= rng[0] < rng[1]
        ):
            raise ValueError(
                f"from_mergekit: slice {i} needs `layer_range: [start, end]` with 0 <= start < "
                f"end, got {rng!r}."
            )
        models.add(str(s.get("model")))
        src.extend(range(rng[0], rng[1]))
    if len(models) != 1:
        raise ValueError(
            f"from_mergekit: the slices name several models {sorted(models)}; growth reads one."
        )
    return layer_map(src, name=f"mergekit({len(slices)} slices)")


_IDENTITY_SCALE: dict[str, list[dict[str, Any]]] = {
    "scale": [
        {"filter": "o_proj", "value": 0.0},
        {"filter": "down_proj", "value": 0.0},
        {"value": 1.0},
    ]
}


def to_mergekit(
    op: AbstractGrowth | Plan,
    depth: int | None = None,
    *,
    model: str,
    dtype: str | None = None,
    preserve: bool = False,
) -> dict[str, Any]:
    """The mergekit passthrough config of a copying operator, as a dict (dump it as YAML).

    Runs of consecutive source layers become slices. Mixes (`interpolate`) have no
    passthrough form and are refused; ties are written as copies.

    **Arguments:**

    - `op`: a growth operator (then `depth` is needed) or a [`stackops.Plan`][].
    - `depth`: the model's number of layers.
    - `model`: the model path or name written into each slice.
    - `dtype`: an optional `dtype:` entry (e.g. `"bfloat16"`).
    - `preserve`: give the slices of inserted layers mergekit's
      `parameters: {scale: ...}` that zeroes `o_proj` and `down_proj`, the identity blocks
      of `grow(..., preserve=True)` (mergekit multiplies by 0.0, so a negative weight
      becomes -0.0: equal in value, not in bytes). [`stackops.from_mergekit`][] does not
      read such parameters back.

    **Returns:** `{"merge_method": "passthrough", "slices": [...]}` (plus `dtype`).

    !!! Example

        ```python
        import stackops as so

        cfg = so.to_mergekit(so.solar(drop=8), 32, model="base")
        assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == [[0, 24], [8, 32]]
        assert so.from_mergekit(cfg).plan(32).sources() == so.solar(drop=8).plan(32).sources()
        ```
    """
    if isinstance(op, Plan):
        plan = op
    elif isinstance(op, AbstractGrowth):
        if depth is None:
            raise ValueError("to_mergekit: pass the model's `depth` with an operator.")
        plan = op.plan(depth)
    else:
        raise TypeError(f"to_mergekit: `op` must be a growth operator or a Plan, got {op!r}.")
    if not isinstance(model, str) or not model:
        raise TypeError("to_mergekit: `model` must be the model's path or name (a string).")
    sources: list[int] = []
    inserted = set(plan.inserted) if preserve else set()
    for q, i in enumerate(plan.order):
        spec = plan.layers[i]
        if isinstance(spec, Mix) and not spec.is_copy:
            raise ValueError(
                f"to_mergekit: position {q} of {plan.name} is a mix ({spec!r}); passthrough "
                "slices can only copy layers."
            )
        sources.append(spec.source if isinstance(spec, Keep) else spec.sources[0])
    slices = []
    start = 0
    for q in range(1, len(sources) + 1):
        if (
            q == len(sources)
            or sources[q] != sources[q - 1] + 1
            or (q in inserted) != (q - 1 in inserted)
        ):
            rng = [sources[start], sources[q - 1] + 1]
            src: dict[str, Any] = {"model": model, "layer_range": rng}
            if start in inserted:
                src["parameters"] = {k: [dict(e) for e in v] for k, v in _IDENTITY_SCALE.items()}
            slices.append({"sources": [src]})
            start = q
    out: dict[str, Any] = {"slices": slices, "merge_method": "passthrough"}
    if dtype is not None:
        out["dtype"] = dtype
    return out
