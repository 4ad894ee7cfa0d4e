"""The training configuration: one typed, frozen dataclass, presets and overrides.

A [`TrainConfig`][] describes a whole run: the model, the growth method and its stage
schedule, the optimiser, the data, evaluation, checkpoints and logging. It is validated
when it is made (a bad value raises at once, naming the field and the fix), saved as
`config.json` in every run directory, and stored in every checkpoint's manifest.

Presets (`smoke`, `cpu`, `gpu`) are starting points; [`apply_overrides`][] changes fields
from `key=value` strings, as the command line does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "TrainConfig",
    "PRESETS",
    "preset",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_diff",
    "RESUMABLE_FIELDS",
]

COMPUTE_DTYPES = ("float32", "bfloat16")
OPT_POLICIES = ("copy", "zero", "init")
PROVENANCE_KEY = "provenance"  # not a field: config.json's record of where a run ran
ATTENTION_CHOICES = ("auto", "xla", "cpu-kernel", "dot-product")  # see stackops_harness.attention


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    The model is the reference [`stackops.models.DecoderLM`][] of final depth `depth`.
    Growth methods train `stages` stages with the Prop-α schedule
    `stackops.prop_schedule(total_steps, stages, alpha)`; stage `i` (1-based) has
    `i * block` layers, `block = depth // stages`. `method="baseline"` trains the final
    depth for the whole budget.

    **Arguments** (grouped):

    - Model: `d_model`, `n_heads`, `d_ff` (`None`: `4 * d_model`), `depth` (final number
      of blocks), `seq_len` (context), `vocab_size`, `norm` (`"rms"`/`"layer"`), `pos`
      (`"rope"`/`"learned"`), `unroll` (how the blocks' `lax.scan` is unrolled: 0 unrolls
      every block, the fastest on CPU (see docs/training.md); 1 compiles one block, so
      compile time stays flat as depth grows; `n` unrolls `n` blocks per iteration),
      `attention` (the attention core: `"auto"` uses the fused CPU kernel of
      `stackops_harness.attention` where it applies (CPU, float32, head dimension a multiple of 16)
      and XLA's `jax.numpy` core elsewhere; `"xla"` or `"cpu-kernel"` force one).
      On GPU `"auto"` is `"dot-product"`: `jax.nn.dot_product_attention`, through cuDNN's
      fused kernel where it applies (bfloat16, head dimension a multiple of 8), XLA's
      implementation otherwise.
    - Growth: `method` (a name from `stackops_harness.methods.method_names()`, `"a+b"` to compose
      two operators per stage, or `"custom"` with an operator passed to `train`), `stages`,
      `alpha`, `preserve` (grow function-preservingly: new blocks start as identities),
      `opt_policy` (moments of new layers: `"copy"`, `"zero"` or `"init"`), `interp_t`
      (mixing weight of `interpolate`).
    - Optimisation: `total_steps`, `global_batch` (rows per step over all devices and
      processes), `lr` (peak), `min_lr_ratio` (final LR / peak), `warmup_steps`,
      `weight_decay`, `b1`, `b2`, `grad_clip` (global-norm clip; 0 disables),
      `compute_dtype` (`"float32"` or `"bfloat16"` matmuls; parameters stay float32), `seed`
      (initialisation), `data_seed` (batch order).
    - Data: `data_dir` (a directory with `train.bin` / `val.bin`; `""` builds the Python
      standard library's sources into `data/stdlib/` on first use).
    - Evaluation: `eval_every` (steps; 0 evaluates only at the end), `eval_batches`,
      `eval_batch` (`None`: `global_batch`).
    - Checkpoints: `ckpt_every` (steps; 0: only at stage boundaries and the end),
      `keep_checkpoints`, `async_checkpoints`.
    - Sharding: `fsdp_min_size` (leaves with at least this many elements are sharded
      over the data axis; 0 replicates everything).
    - Runtime: `log_every`, `progress` (a tqdm bar on a terminal), `compile_cache` (a
      directory for JAX's persistent compilation cache; `""` disables it).

    !!! Example

        ```python
        from stackops_harness.config import TrainConfig, preset

        cfg = preset("smoke")
        assert cfg.block * cfg.stages == cfg.depth
        try:
            TrainConfig(depth=6, stages=4)
        except ValueError as e:
            print(e)   # TrainConfig: stages=4 does not divide depth=6; ... [1, 2, 3, 6] ...
        ```
    """

    # Model.
    d_model: int = 128
    n_heads: int = 4
    d_ff: int | None = None
    depth: int = 8
    seq_len: int = 128
    vocab_size: int = 256
    norm: str = "rms"
    pos: str = "rope"
    unroll: int = 0
    attention: str = "auto"
    # Growth.
    method: str = "midas"
    stages: int = 4
    alpha: float = 1.0
    preserve: bool = False
    opt_policy: str = "copy"
    interp_t: float = 0.5
    # Optimisation.
    total_steps: int = 1000
    global_batch: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    compute_dtype: str = "float32"
    seed: int = 0
    data_seed: int = 0
    # Data.
    data_dir: str = ""
    # Evaluation.
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch: int | None = None
    # Checkpoints.
    ckpt_every: int = 250
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Sharding.
    fsdp_min_size: int = 2**14
    # Runtime.
    log_every: int = 10
    progress: bool = True
    compile_cache: str = ""

    def __post_init__(self):
        hints = _field_types()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
            if hints[f.name] is float:  # store 1 as 1.0, so JSON round trips are exact
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        for name in ("d_model", "n_heads", "depth", "seq_len", "vocab_size", "stages"):
            _positive(name, getattr(self, name))
        for name in ("total_steps", "global_batch", "eval_batches", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("unroll", "warmup_steps", "eval_every", "ckpt_every", "fsdp_min_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.log_every < 1:
            raise ValueError(f"TrainConfig.log_every must be >= 1, got {self.log_every}.")
        if self.d_ff is not None:
            _positive("d_ff", self.d_ff)
        if self.eval_batch is not None:
            _positive("eval_batch", self.eval_batch)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TrainConfig: d_model={self.d_model} is not divisible by n_heads="
                f"{self.n_heads}; pick n_heads dividing d_model (e.g. "
                f"{math.gcd(self.d_model, self.n_heads)})."
            )
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"TrainConfig: rotary positions need an even head dimension, but d_model / n_heads"
                f" = {self.d_model // self.n_heads}; change n_heads or use pos='learned'."
            )
        _choice("norm", self.norm, ("rms", "layer"))
        _choice("pos", self.pos, ("rope", "learned"))
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("attention", self.attention, ATTENTION_CHOICES)
        _choice("opt_policy", self.opt_policy, OPT_POLICIES)
        if self.depth % self.stages:
            divisors = [k for k in range(1, self.depth + 1) if self.depth % k == 0]
            raise ValueError(
                f"TrainConfig: stages={self.stages} does not divide depth={self.depth}; every "
                f"stage adds depth/stages layers, so use stages in {divisors} or change depth."
            )
        if self.total_steps < self.stages:
            raise ValueError(
                f"TrainConfig: total_steps={self.total_steps} is less than stages={self.stages}; "
                "every stage needs at least one step."
            )
        if not self.alpha >= 0:
            raise ValueError(f"TrainConfig.alpha must be >= 0 (0: equal stages), got {self.alpha}.")
        if not 0.0 <= self.interp_t <= 1.0:
            raise ValueError(f"TrainConfig.interp_t must lie in [0, 1], got {self.interp_t}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}."
            )
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"TrainConfig: warmup_steps={self.warmup_steps} exceeds total_steps="
                f"{self.total_steps}."
            )
        for name in ("lr", "b1", "b2", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("lr", "b1", "b2", "weight_decay", "grad_clip", "alpha", "min_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(
                    f"TrainConfig.{name} must be a finite number, got {getattr(self, name)}."
                )
        if not (self.b1 < 1 and self.b2 < 1):
            raise ValueError(f"TrainConfig: b1 and b2 must be < 1, got {self.b1}, {self.b2}.")
        # Method names are checked against the registry (which may grow at run time).
        from .methods import check_method_name

        check_method_name(self.method)

    @property
    def block(self) -> int:
        """Layers added per stage: `depth // stages`."""
        return self.depth // self.stages

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained on per optimiser step: `global_batch * seq_len`."""
        return self.global_batch * self.seq_len

    @property
    def eval_rows(self) -> int:
        """Rows per evaluation batch (`eval_batch`, or `global_batch` when unset)."""
        return self.eval_batch if self.eval_batch is not None else self.global_batch


# Fields that may change when a run resumes: they change how it is observed, saved or
# executed (scan unrolling, attention kernel, sharding), never the function it computes.
# Everything else must match the checkpoint's manifest.
RESUMABLE_FIELDS = frozenset(
    {
        "unroll",
        "attention",
        "fsdp_min_size",
        "eval_every",
        "ckpt_every",
        "keep_checkpoints",
        "async_checkpoints",
        "log_every",
        "progress",
        "compile_cache",
        "data_dir",
    }
)

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: a 4-stage run of a tiny model, for tests and a first look.
    "smoke": dict(
        d_model=32,
        n_heads=2,
        depth=4,
        stages=4,
        seq_len=32,
        global_batch=8,
        total_steps=40,
        warmup_steps=4,
        lr=3e-3,
        eval_every=10,
        eval_batches=2,
        ckpt_every=10,
        log_every=1,
        keep_checkpoints=2,
    ),
    # Minutes to tens of minutes on two CPU cores (~1.6M parameters, 8 blocks).
    "cpu": dict(
        d_model=128,
        n_heads=4,
        depth=8,
        stages=4,
        seq_len=128,
        global_batch=16,
        total_steps=1500,
        warmup_steps=75,
        lr=3e-3,
        eval_every=100,
        eval_batches=4,
        ckpt_every=250,
        log_every=10,
    ),
    # An accelerator run: 114M parameters (16 blocks of width 768), bf16 matmuls, 32K
    # tokens per step (~1B tokens in all).
    "gpu": dict(
        d_model=768,
        n_heads=12,
        depth=16,
        stages=4,
        seq_len=512,
        global_batch=64,
        total_steps=30000,
        warmup_steps=1000,
        lr=6e-4,
        weight_decay=0.1,
        compute_dtype="bfloat16",
        unroll=1,
        eval_every=500,
        eval_batches=16,
        eval_batch=64,
        ckpt_every=1000,
        log_every=50,
    ),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset configuration, optionally with some fields replaced.

    **Arguments:**

    - `name`: one of `PRESETS` (`"smoke"`, `"cpu"`, `"gpu"`).
    - `overrides`: field values to replace, e.g. `method="gradstack"`.

    **Returns:** the validated [`TrainConfig`][].

    !!! Example

        ```python
        cfg = preset("smoke", method="gradstack", total_steps=20)
        assert cfg.d_model == 32 and cfg.method == "gradstack"
        ```
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
    return config_from_dict({**PRESETS[name], **overrides})


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a JSON-able dict of its fields.

    !!! Example

        ```python
        d = config_to_dict(preset("smoke"))
        assert config_from_dict(d) == preset("smoke")
        ```
    """
    return dataclasses.asdict(config)


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A [`TrainConfig`][] from a dict of field values (missing fields take defaults).

    Unknown keys raise, naming the closest field, so a typo never goes unnoticed.

    !!! Example

        ```python
        cfg = config_from_dict({"depth": 6, "stages": 3})
        assert cfg.block == 2
        ```
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    # A run's config.json also records where it ran (stackops_harness.provenance).
    values = {k: v for k, v in values.items() if k != PROVENANCE_KEY}
    for key in values:
        if key not in names:
            raise ValueError(f"Unknown config field {key!r}{_did_you_mean(key, names)}.")
    return TrainConfig(**dict(values))


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply `key=value` strings to a config (as `--set key=value` does on the command line).

    Values are parsed by the field's type: integers, floats, `true`/`false` for booleans,
    `none` for optional fields, and strings as they are.

    **Arguments:**

    - `config`: the config to start from.
    - `overrides`: strings such as `"method=gradstack"`, `"d_ff=none"`.

    **Returns:** a new, validated config.

    !!! Example

        ```python
        cfg = apply_overrides(preset("smoke"), ["method=gradstack", "total_steps=80"])
        assert (cfg.method, cfg.total_steps) == ("gradstack", 80)
        ```
    """
    values = config_to_dict(config)
    hints = _field_types()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key=value (e.g. depth=8).")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise ValueError(f"Unknown config field {key!r}{_did_you_mean(key, list(hints))}.")
        values[key] = parse_value(key, raw.strip(), hints[key])
    return config_from_dict(values)


def parse_value(name: str, raw: str, tp: Any) -> Any:
    """Parse a command-line string into a value of the field type `tp`.

    !!! Example

        ```python
        assert parse_value("d_ff", "none", int | None) is None
        assert parse_value("preserve", "true", bool) is True
        ```
    """
    args = typing.get_args(tp)
    if _is_optional(tp):
        if raw.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(
            f"Config field {name!r} needs a {getattr(tp, '__name__', tp)}, got {raw!r}."
        ) from None


def config_diff(saved: Mapping[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The fields that differ between a saved config dict and `current`, ignoring
    [`RESUMABLE_FIELDS`][].

    **Returns:** `{field: (saved_value, current_value)}`; empty when a resume is allowed.

    !!! Example

        ```python
        saved = config_to_dict(preset("smoke"))
        assert config_diff(saved, preset("smoke", log_every=5)) == {}
        assert config_diff(saved, preset("smoke", depth=8, stages=4)) == {"depth": (4, 8)}
        ```
    """
    cur = config_to_dict(current)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(cur)):
        if key in RESUMABLE_FIELDS:
            continue
        a, b = saved.get(key, "<missing>"), cur.get(key, "<missing>")
        if _normalise(a) != _normalise(b):
            out[key] = (a, b)
    return out


def format_config(config: TrainConfig) -> str:
    """The config as indented JSON (what `config.json` holds).

    !!! Example

        ```python
        import json

        assert json.loads(format_config(preset("smoke")))["depth"] == 4
        ```
    """
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- helpers


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _check_type(name: str, value: Any, tp: Any) -> None:
    if _is_optional(tp):
        if value is None:
            return
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise TypeError(
            f"TrainConfig.{name} must be a {tp.__name__}, got {value!r} ({type(value).__name__})."
        )


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value}.")


def _choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"TrainConfig.{name} must be one of {list(options)}, got {value!r}.")


def _did_you_mean(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; fields are {sorted(names)}"


def _normalise(v: Any) -> Any:
    # JSON turns tuples into lists and ints into floats where a float field held an int.
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
