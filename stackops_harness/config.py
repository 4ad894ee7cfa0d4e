"""The training configuration: typed, frozen sections, presets and overrides.

A [`TrainConfig`][] describes a whole run. It is made of seven sections, each a frozen
dataclass: [`ModelConfig`][] (the architecture), [`GrowthConfig`][] (the method and its
stage schedule), [`OptimiserConfig`][], [`DataConfig`][], [`EvalConfig`][] (evaluation),
[`CheckpointConfig`][] (checkpointing) and [`RuntimeConfig`][] (how the run executes and
reports: scan unrolling, attention kernel, sharding, logging). Field names are unique
across sections, so every field also reads and writes by its flat name: `cfg.depth`,
`preset("smoke", depth=8)`, `apply_overrides(cfg, ["depth=8"])`.

Every field carries metadata: a one-line `help` (shown by `stackops-train --help`),
`resumable` (it may change when a run resumes: [`RESUMABLE_FIELDS`][]) and `compiled` (it
changes the compiled train step: [`COMPILED_FIELDS`][]). A config is validated when it is
made (a bad value raises at once, naming the field and the fix), saved as `config.json` in
every run directory and stored in every checkpoint's manifest ([`config_to_dict`][]: one
dict per section). [`config_from_dict`][] also reads the flat format of older runs.

Presets (`smoke`, `cpu`, `gpu`; defined in `stackops_harness.presets`) are starting
points; [`apply_overrides`][] changes fields from `key=value` strings, as the command line
does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from .presets import TRAIN_PRESETS

if typing.TYPE_CHECKING:
    from stackops.models import LMConfig

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "GrowthConfig",
    "OptimiserConfig",
    "DataConfig",
    "EvalConfig",
    "CheckpointConfig",
    "RuntimeConfig",
    "SECTIONS",
    "PRESETS",
    "preset",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_flat_dict",
    "config_diff",
    "config_fields",
    "RESUMABLE_FIELDS",
    "COMPILED_FIELDS",
    "CONFIG_FORMAT",
]

Norm = Literal["rms", "layer"]
Pos = Literal["rope", "learned"]
Attention = Literal["auto", "xla", "cpu-kernel", "dot-product"]  # stackops_harness.attention
ComputeDtype = Literal["float32", "bfloat16"]
OptPolicy = Literal["copy", "zero", "init"]

COMPUTE_DTYPES: tuple[str, ...] = typing.get_args(ComputeDtype)
OPT_POLICIES: tuple[str, ...] = typing.get_args(OptPolicy)
ATTENTION_CHOICES: tuple[str, ...] = typing.get_args(Attention)
PROVENANCE_KEY = "provenance"  # not a field: config.json's record of where a run ran
FORMAT_KEY = "format"
CONFIG_FORMAT = 2
"""The version of [`config_to_dict`][]'s layout: 2 is one dict per section (format 1, the
flat dict of all fields that runs before the sections wrote, has no `"format"` key)."""


def _field(default: Any, help: str, *, resumable: bool, compiled: bool) -> Any:
    """A config field: its default, one line of help, and the two flags every field states."""
    return dataclasses.field(
        default=default, metadata={"help": help, "resumable": resumable, "compiled": compiled}
    )


# --------------------------------------------------------------------------- the sections


class _Section:
    """Checks shared by the sections: every field's type (Literal choices included), and
    floats stored as floats so that JSON round trips are exact."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
            if hints[f.name] is float:
                object.__setattr__(self, f.name, float(value))


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """The architecture: the reference [`stackops.models.DecoderLM`][] at its final depth.

    Validated by building its [`stackops.models.LMConfig`][] (the one home of the model's
    checks), with errors naming the `TrainConfig` field.

    !!! Example

        ```python
        m = ModelConfig(d_model=64, n_heads=4, depth=6)
        assert m.lm_config(2).n_layers == 2 and m.lm_config().n_layers == 6
        ```
    """

    d_model: int = _field(128, "model width", resumable=False, compiled=True)
    n_heads: int = _field(
        4, "attention heads (must divide d_model)", resumable=False, compiled=True
    )
    d_ff: int | None = _field(
        None, "MLP width (none: 4 * d_model)", resumable=False, compiled=True
    )
    depth: int = _field(8, "final number of blocks", resumable=False, compiled=True)
    seq_len: int = _field(128, "context length in tokens", resumable=False, compiled=True)
    vocab_size: int = _field(
        256, "number of token ids (256: bytes)", resumable=False, compiled=True
    )
    norm: Norm = _field("rms", "RMSNorm or LayerNorm", resumable=False, compiled=True)
    pos: Pos = _field("rope", "rotary or learned positions", resumable=False, compiled=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lm_config()

    def lm_config(self, depth: int | None = None) -> LMConfig:
        """The [`stackops.models.LMConfig`][] of this architecture at `depth` blocks
        (default: the final `depth`); raises `ValueError` naming the `TrainConfig` field."""
        # Imported here, not at the top: this module stays free of JAX, so that the command
        # line can set XLA's flags (--devices) after reading its arguments.
        from stackops.models import LMConfig

        try:
            return LMConfig(
                vocab_size=self.vocab_size,
                d_model=self.d_model,
                n_heads=self.n_heads,
                n_layers=self.depth if depth is None else depth,
                d_ff=self.d_ff,
                max_len=self.seq_len,
                norm=self.norm,
                pos=self.pos,
            )
        except ValueError as e:
            message = str(e).replace("LMConfig.n_layers", "TrainConfig.depth")
            message = message.replace("LMConfig.max_len", "TrainConfig.seq_len")
            raise ValueError(message.replace("LMConfig", "TrainConfig")) from None


@dataclasses.dataclass(frozen=True)
class GrowthConfig(_Section):
    """The growth method and its stage schedule (Prop-α: `stackops.prop_schedule`).

    `method` is checked against the registry where methods are resolved
    (`stackops_harness.methods.growth_schedule`, which the trainer calls before any work),
    since `register_method` may add names at run time.

    !!! Example

        ```python
        assert GrowthConfig(method="gradstack", stages=2).alpha == 1.0
        ```
    """

    method: str = _field(
        "midas",
        "growth method: baseline, midas, gradstack, interpolate, lidas, looped, untie, "
        "a+b (composition) or custom",
        resumable=False,
        compiled=False,
    )
    stages: int = _field(4, "number of stages (must divide depth)", resumable=False, compiled=False)
    alpha: float = _field(
        1.0, "Prop-alpha exponent of the stage lengths (0: equal)", resumable=False, compiled=False
    )
    preserve: bool = _field(
        False, "grow function-preservingly (new blocks start as identities)",
        resumable=False, compiled=True,
    )
    opt_policy: OptPolicy = _field(
        "copy", "optimizer moments of new layers", resumable=False, compiled=True
    )
    interp_t: float = _field(
        0.5, "mixing weight of the interpolate method", resumable=False, compiled=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.method or any(not part for part in self.method.split("+")):
            raise ValueError(
                f"TrainConfig.method must be a method name or a composition 'a+b', got "
                f"{self.method!r}."
            )
        _positive("stages", self.stages)
        _finite("alpha", self.alpha)
        if not self.alpha >= 0:
            raise ValueError(f"TrainConfig.alpha must be >= 0 (0: equal stages), got {self.alpha}.")
        if not 0.0 <= self.interp_t <= 1.0:
            raise ValueError(f"TrainConfig.interp_t must lie in [0, 1], got {self.interp_t}.")


@dataclasses.dataclass(frozen=True)
class OptimiserConfig(_Section):
    """The optimiser (AdamW, warmup then cosine), the step budget and batch, and the seed.

    !!! Example

        ```python
        assert OptimiserConfig(lr=1e-3).min_lr_ratio == 0.1
        ```
    """

    total_steps: int = _field(1000, "optimiser steps in all", resumable=False, compiled=True)
    global_batch: int = _field(
        16, "rows per step over all devices and processes", resumable=False, compiled=True
    )
    lr: float = _field(3e-3, "peak learning rate", resumable=False, compiled=True)
    min_lr_ratio: float = _field(
        0.1, "final learning rate / peak", resumable=False, compiled=True
    )
    warmup_steps: int = _field(50, "linear warmup steps", resumable=False, compiled=True)
    weight_decay: float = _field(0.1, "AdamW weight decay", resumable=False, compiled=True)
    b1: float = _field(0.9, "Adam beta1", resumable=False, compiled=True)
    b2: float = _field(0.95, "Adam beta2", resumable=False, compiled=True)
    grad_clip: float = _field(
        1.0, "global-norm gradient clip (0 disables)", resumable=False, compiled=True
    )
    compute_dtype: ComputeDtype = _field(
        "float32", "matmul precision (parameters stay float32)", resumable=False, compiled=True
    )
    seed: int = _field(0, "initialisation seed", resumable=False, compiled=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("total_steps", "global_batch"):
            _positive(name, getattr(self, name))
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}.")
        for name in ("lr", "b1", "b2", "weight_decay", "grad_clip", "min_lr_ratio"):
            _finite(name, getattr(self, name))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}."
            )
        for name in ("lr", "b1", "b2", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if not (self.b1 < 1 and self.b2 < 1):
            raise ValueError(f"TrainConfig: b1 and b2 must be < 1, got {self.b1}, {self.b2}.")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"TrainConfig: warmup_steps={self.warmup_steps} exceeds total_steps="
                f"{self.total_steps}."
            )


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """The token files and the batch order.

    !!! Example

        ```python
        assert DataConfig().data_dir == ""
        ```
    """

    data_dir: str = _field(
        "",
        "directory with train.bin and val.bin (empty: the Python standard library, built "
        "on first use)",
        resumable=True,  # the manifest's data hashes check the files, wherever they are
        compiled=False,
    )
    data_seed: int = _field(0, "seed of the batch order", resumable=False, compiled=False)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    """Evaluation on fixed validation batches.

    !!! Example

        ```python
        assert EvalConfig(eval_every=0).eval_batches == 4
        ```
    """

    eval_every: int = _field(
        100, "steps between evaluations (0: only at the end)", resumable=True, compiled=False
    )
    eval_batches: int = _field(
        4, "validation batches per evaluation", resumable=False, compiled=False
    )
    eval_batch: int | None = _field(
        None, "rows per validation batch (none: global_batch)", resumable=False, compiled=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("eval_every", self.eval_every)
        _positive("eval_batches", self.eval_batches)
        if self.eval_batch is not None:
            _positive("eval_batch", self.eval_batch)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """When checkpoints are saved and how many are kept.

    !!! Example

        ```python
        assert CheckpointConfig(ckpt_every=0).keep_checkpoints == 3
        ```
    """

    ckpt_every: int = _field(
        250, "steps between checkpoints (0: only at stage boundaries and the end)",
        resumable=True, compiled=False,
    )
    keep_checkpoints: int = _field(3, "checkpoints kept", resumable=True, compiled=False)
    async_checkpoints: bool = _field(
        True, "save in the background while training goes on", resumable=True, compiled=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("ckpt_every", self.ckpt_every)
        _positive("keep_checkpoints", self.keep_checkpoints)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(_Section):
    """How the run executes and reports: never what it computes, so all of it may change on
    resume (bit-identical resumption assumes `unroll`, `attention` and `fsdp_min_size` are
    unchanged).

    `unroll`: 0 unrolls every block (the fastest on CPU, see docs/training.md); 1 compiles
    one block, so compile time stays flat as depth grows; `n` unrolls `n` blocks per
    iteration. `attention`: `"auto"` uses the fused CPU kernel of
    `stackops_harness.attention` where it applies (CPU, float32, head dimension a multiple
    of 16) and XLA's `jax.numpy` core elsewhere; on GPU `"auto"` is `"dot-product"`:
    `jax.nn.dot_product_attention`, through cuDNN's fused kernel where it applies (bfloat16,
    head dimension a multiple of 8), XLA's implementation otherwise; `"xla"` or
    `"cpu-kernel"` force one.

    !!! Example

        ```python
        assert RuntimeConfig(unroll=1, attention="xla").log_every == 10
        ```
    """

    unroll: int = _field(
        0, "blocks unrolled per scan iteration (0: all)", resumable=True, compiled=True
    )
    attention: Attention = _field(
        "auto", "attention core (auto: the fused CPU kernel, or cuDNN's on GPU, where they "
        "apply)", resumable=True, compiled=True,
    )
    fsdp_min_size: int = _field(
        2**14, "shard leaves with at least this many elements over the data axis "
        "(0: replicate all)", resumable=True, compiled=True,
    )
    log_every: int = _field(10, "steps between train records", resumable=True, compiled=False)
    progress: bool = _field(True, "a progress bar on a terminal", resumable=True, compiled=False)
    compile_cache: str = _field(
        "", "directory of JAX's persistent compilation cache (empty: off)",
        resumable=True, compiled=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("unroll", self.unroll)
        _non_negative("fsdp_min_size", self.fsdp_min_size)
        if self.log_every < 1:
            raise ValueError(f"TrainConfig.log_every must be >= 1, got {self.log_every}.")


SECTIONS: dict[str, type[Any]] = {
    "model": ModelConfig,
    "growth": GrowthConfig,
    "optimiser": OptimiserConfig,
    "data": DataConfig,
    "evaluation": EvalConfig,
    "checkpointing": CheckpointConfig,
    "runtime": RuntimeConfig,
}
"""The sections of a [`TrainConfig`][], by attribute name, in order."""

_SECTION_OF: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}
assert len(_SECTION_OF) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()), (
    "config field names must be unique across sections"
)


def config_fields() -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every config field as `(section, field, type)`, in section order; the field's
    `metadata` holds `help`, `resumable` and `compiled`.

    !!! Example

        ```python
        section, f, tp = next(config_fields())
        assert (section, f.name, tp) == ("model", "d_model", int)
        assert f.metadata["compiled"] and not f.metadata["resumable"]
        ```
    """
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f, hints[f.name]


RESUMABLE_FIELDS: frozenset[str] = frozenset(
    f.name for _, f, _ in config_fields() if f.metadata["resumable"]
)
"""Fields that may change when a run resumes (metadata `resumable`): they change how it is
observed, saved or executed (scan unrolling, attention kernel, sharding), never the
function it computes. Everything else must match the checkpoint's manifest."""

COMPILED_FIELDS: frozenset[str] = frozenset(
    f.name for _, f, _ in config_fields() if f.metadata["compiled"]
)
"""Fields that change what a compiled train step or growth computes (metadata
`compiled`); the trainer's cache of compiled steps is keyed by them."""


# --------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig:
    """Everything that defines a training run, in seven typed sections.

    The model is the reference [`stackops.models.DecoderLM`][] of final depth `depth`.
    Growth methods train `stages` stages with the Prop-α schedule
    `stackops.prop_schedule(total_steps, stages, alpha)`; stage `i` (1-based) has
    `i * block` layers, `block = depth // stages`. `method="baseline"` trains the final
    depth for the whole budget.

    **Arguments:** keyword only, any mix of

    - sections: `model`, `growth`, `optimiser`, `data`, `evaluation`, `checkpointing`,
      `runtime`, each a section instance ([`ModelConfig`][], ...) or a mapping of its
      fields (missing sections take their defaults);
    - flat field names (`depth=8`, `lr=1e-3`), which replace that field of its section.

    Every field reads by its flat name too (`cfg.depth` is `cfg.model.depth`);
    [`TrainConfig.replace`][] (or `dataclasses.replace`) makes a changed copy. Each field's
    meaning is its metadata's `help` ([`config_fields`][], `stackops-train --help`).

    !!! Example

        ```python
        from stackops_harness.config import TrainConfig, preset

        cfg = preset("smoke")
        assert cfg.block * cfg.stages == cfg.depth and cfg.model.depth == cfg.depth
        assert cfg.replace(depth=8).depth == 8
        try:
            TrainConfig(depth=6, stages=4)
        except ValueError as e:
            print(e)   # TrainConfig: stages=4 does not divide depth=6; ... [1, 2, 3, 6] ...
        ```
    """

    model: ModelConfig
    growth: GrowthConfig
    optimiser: OptimiserConfig
    data: DataConfig
    evaluation: EvalConfig
    checkpointing: CheckpointConfig
    runtime: RuntimeConfig

    def __init__(self, **values: Any) -> None:
        given: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key in SECTIONS:
                given[key] = value
            elif key in _SECTION_OF:
                flat[_SECTION_OF[key]][key] = value
            else:
                raise TypeError(
                    f"TrainConfig got an unknown field {key!r}"
                    f"{_did_you_mean(key, [*SECTIONS, *_SECTION_OF])}."
                )
        for name, cls in SECTIONS.items():
            section = given.get(name)
            if section is None:
                section = cls(**flat[name])
            elif isinstance(section, cls):
                if flat[name]:
                    section = dataclasses.replace(section, **flat[name])
            elif isinstance(section, Mapping):
                _check_keys(name, section)
                section = cls(**{**section, **flat[name]})
            else:
                raise TypeError(
                    f"TrainConfig.{name} must be a {cls.__name__} or a mapping of its fields, "
                    f"got {type(section).__name__}."
                )
            object.__setattr__(self, name, section)
        self._check()

    def _check(self) -> None:
        """Checks across sections."""
        depth, stages = self.model.depth, self.growth.stages
        if depth % stages:
            divisors = [k for k in range(1, depth + 1) if depth % k == 0]
            raise ValueError(
                f"TrainConfig: stages={stages} does not divide depth={depth}; every "
                f"stage adds depth/stages layers, so use stages in {divisors} or change depth."
            )
        if self.optimiser.total_steps < stages:
            raise ValueError(
                f"TrainConfig: total_steps={self.optimiser.total_steps} is less than "
                f"stages={stages}; every stage needs at least one step."
            )

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: a flat field name reads from its section.
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(
                f"TrainConfig has no field {name!r}{_did_you_mean(name, list(_SECTION_OF))}."
            )
        return getattr(object.__getattribute__(self, section), name)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields replaced: flat names (`depth=8`), whole
        sections, or a section name with a mapping of the fields to change in it.

        !!! Example

            ```python
            from stackops_harness.config import preset

            cfg = preset("smoke")
            assert cfg.replace(lr=1e-3).lr == 1e-3
            assert cfg.replace(model={"depth": 8}).depth == 8
            ```
        """
        values: dict[str, Any] = {name: getattr(self, name) for name in SECTIONS}
        for key, value in changes.items():
            if key in SECTIONS and isinstance(value, Mapping):
                _check_keys(key, value)
                values[key] = dataclasses.replace(values[key], **value)
            else:
                values[key] = value
        return TrainConfig(**values)

    @property
    def block(self) -> int:
        """Layers added per stage: `depth // stages`."""
        return self.model.depth // self.growth.stages

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained on per optimiser step: `global_batch * seq_len`."""
        return self.optimiser.global_batch * self.model.seq_len

    @property
    def eval_rows(self) -> int:
        """Rows per evaluation batch (`eval_batch`, or `global_batch` when unset)."""
        rows = self.evaluation.eval_batch
        return rows if rows is not None else self.optimiser.global_batch


PRESETS: dict[str, dict[str, Any]] = TRAIN_PRESETS
"""The training presets (`stackops_harness.presets.TRAIN_PRESETS`): flat field values."""


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset configuration, optionally with some fields replaced.

    **Arguments:**

    - `name`: one of `PRESETS` (`"smoke"`, `"cpu"`, `"gpu"`).
    - `overrides`: field values to replace, e.g. `method="gradstack"` (as for
      [`TrainConfig.replace`][]).

    **Returns:** the validated [`TrainConfig`][].

    !!! Example

        ```python
        cfg = preset("smoke", method="gradstack", total_steps=20)
        assert cfg.d_model == 32 and cfg.method == "gradstack"
        ```
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
    return TrainConfig(**PRESETS[name]).replace(**overrides)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a JSON-able dict: `{"format": 2, "model": {...}, "growth": {...}, ...}`
    (what `config.json` and checkpoint manifests hold).

    !!! Example

        ```python
        d = config_to_dict(preset("smoke"))
        assert d["model"]["depth"] == 4 and d["format"] == 2
        assert config_from_dict(d) == preset("smoke")
        ```
    """
    out: dict[str, Any] = {FORMAT_KEY: CONFIG_FORMAT}
    for name in SECTIONS:
        out[name] = dataclasses.asdict(getattr(config, name))
    return out


def config_to_flat_dict(config: TrainConfig) -> dict[str, Any]:
    """Every field by its flat name (the layout of format 1).

    !!! Example

        ```python
        flat = config_to_flat_dict(preset("smoke"))
        assert flat["depth"] == 4 and config_from_dict(flat) == preset("smoke")
        ```
    """
    return {f.name: getattr(config, f.name) for _, f, _ in config_fields()}


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A [`TrainConfig`][] from a dict: the sectioned format of [`config_to_dict`][], or the
    flat format of older runs (format 1: one key per field), converted automatically.
    Missing fields take their defaults.

    Unknown keys raise, naming the closest field, so a typo never goes unnoticed; a dict
    that mixes the two formats is refused, saying how to convert it.

    !!! Example

        ```python
        cfg = config_from_dict({"depth": 6, "stages": 3})            # flat (format 1)
        assert cfg.block == 2
        assert config_from_dict({"model": {"depth": 6}, "growth": {"stages": 3}}) == cfg
        ```
    """
    return TrainConfig(**_sections_of(values))


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply `key=value` strings to a config (as `--set key=value` does on the command line).

    Keys are flat field names (`depth`) or `section.field` (`model.depth`); `-` may stand
    for `_`. Values are parsed by the field's type: integers, floats, `true`/`false` for
    booleans, `none` for optional fields, and strings as they are.

    **Arguments:**

    - `config`: the config to start from.
    - `overrides`: strings such as `"method=gradstack"`, `"d_ff=none"`, `"growth.alpha=2"`.

    **Returns:** a new, validated config.

    !!! Example

        ```python
        cfg = apply_overrides(preset("smoke"), ["method=gradstack", "optimiser.total_steps=80"])
        assert (cfg.method, cfg.total_steps) == ("gradstack", 80)
        ```
    """
    hints = {f.name: tp for _, f, tp in config_fields()}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key=value (e.g. depth=8).")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if "." in key:
            section, _, name = key.partition(".")
            if section not in SECTIONS:
                raise ValueError(
                    f"Unknown config section {section!r} in {key!r}"
                    f"{_did_you_mean(section, list(SECTIONS))}."
                )
            if _SECTION_OF.get(name) != section:
                names = [f.name for f in dataclasses.fields(SECTIONS[section])]
                raise ValueError(
                    f"Config section {section!r} has no field {name!r}{_did_you_mean(name, names)}."
                )
            key = name
        if key not in hints:
            raise ValueError(f"Unknown config field {key!r}{_did_you_mean(key, list(hints))}.")
        changes[key] = parse_value(key, raw.strip(), hints[key])
    return config.replace(**changes)


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
        return raw  # str, and Literal choices (checked when the config is made)
    except ValueError:
        raise ValueError(
            f"Config field {name!r} needs a {getattr(tp, '__name__', tp)}, got {raw!r}."
        ) from None


def config_diff(saved: Mapping[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The fields that differ between a saved config dict (sectioned, or the flat format of
    older runs) and `current`, ignoring [`RESUMABLE_FIELDS`][].

    **Returns:** `{field: (saved_value, current_value)}` by flat field name; empty when a
    resume is allowed. A saved field that `current` does not know (or the reverse) is a
    difference (shown as `"<missing>"`).

    !!! Example

        ```python
        saved = config_to_dict(preset("smoke"))
        assert config_diff(saved, preset("smoke", log_every=5)) == {}
        assert config_diff(saved, preset("smoke", depth=8, stages=4)) == {"depth": (4, 8)}
        assert config_diff(config_to_flat_dict(preset("smoke")), preset("smoke")) == {}
        ```
    """
    old = _flat_values(saved)
    cur = config_to_flat_dict(current)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(cur)):
        if key in RESUMABLE_FIELDS:
            continue
        a, b = old.get(key, "<missing>"), cur.get(key, "<missing>")
        if _normalise(a) != _normalise(b):
            out[key] = (a, b)
    return out


def format_config(config: TrainConfig) -> str:
    """The config as indented JSON (what `config.json` holds).

    !!! Example

        ```python
        import json

        assert json.loads(format_config(preset("smoke")))["model"]["depth"] == 4
        ```
    """
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- formats


_CONVERT = (
    "convert a flat (format 1) dict with config_to_dict(config_from_dict(flat)), or write "
    "one mapping per section: {'format': 2, 'model': {...}, 'growth': {...}, ...}"
)


def _sections_of(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{section: {field: value}}` from a sectioned or a flat (format 1) config dict."""
    if not isinstance(values, Mapping):
        raise TypeError(f"A config dict must be a mapping, got {type(values).__name__}.")
    # A run's config.json also records where it ran (stackops_harness.provenance).
    values = {k: v for k, v in values.items() if k != PROVENANCE_KEY}
    fmt = values.pop(FORMAT_KEY, None)
    sections = [k for k in values if k in SECTIONS]
    fields = [k for k in values if k in _SECTION_OF]
    for key in values:
        if key not in SECTIONS and key not in _SECTION_OF:
            raise ValueError(
                f"Unknown config field {key!r}{_did_you_mean(key, [*_SECTION_OF, *SECTIONS])}."
            )
    if fmt is not None and fmt != CONFIG_FORMAT:
        raise ValueError(
            f"The config dict has format {fmt!r}; this stackops_harness reads format "
            f"{CONFIG_FORMAT} (sections) and the flat format of older runs (no 'format' key)."
        )
    if sections and fields:
        raise ValueError(
            f"The config dict mixes sections ({', '.join(sections)}) with flat fields "
            f"({', '.join(fields)}), so which value holds is ambiguous; {_CONVERT}."
        )
    if fmt is not None and fields:
        raise ValueError(
            f"The config dict says format {fmt} but holds flat fields ({', '.join(fields)}); "
            f"{_CONVERT}."
        )
    out: dict[str, dict[str, Any]] = {}
    if fields:  # format 1: convert
        for key, value in values.items():
            out.setdefault(_SECTION_OF[key], {})[key] = value
        return out
    for name in sections:
        section = values[name]
        if not isinstance(section, Mapping):
            raise ValueError(
                f"The config dict's {name!r} must be a mapping of its fields, got "
                f"{section!r}; {_CONVERT}."
            )
        _check_keys(name, section)
        out[name] = dict(section)
    return out


def _flat_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for section in _sections_of(values).values() for k, v in section.items()}


def _check_keys(section: str, values: Mapping[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    for key in values:
        if key not in names:
            where = _SECTION_OF.get(key)
            hint = (
                f"; {key!r} belongs to the {where!r} section" if where is not None
                else _did_you_mean(key, names)
            )
            raise ValueError(f"Config section {section!r} has no field {key!r}{hint}.")


# --------------------------------------------------------------------------- helpers


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _check_type(name: str, value: Any, tp: Any) -> None:
    if _is_optional(tp):
        if value is None:
            return
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        choices = list(typing.get_args(tp))
        if value not in choices or not isinstance(value, str):
            raise ValueError(
                f"TrainConfig.{name} must be one of {choices}, got {value!r}; set "
                f"{name}={choices[0]} (or another of those)."
            )
        return
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


def _non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0, got {value}.")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value}.")


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
