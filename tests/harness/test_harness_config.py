"""The training config, growth methods and command line: presets, overrides, bad configs."""

import dataclasses
import json

import equinox as eqx
import jax
import numpy as np
import pytest
from harness_support import run_cli, smoke_cli_args

import stackops as so
from stackops_harness import methods
from stackops_harness.cli import train as train_cli
from stackops_harness.config import (
    COMPILED_FIELDS,
    PRESETS,
    RESUMABLE_FIELDS,
    SECTIONS,
    RuntimeConfig,
    TrainConfig,
    apply_overrides,
    config_diff,
    config_fields,
    config_from_dict,
    config_to_dict,
    config_to_flat_dict,
    preset,
)
from stackops_harness.methods import growth_schedule, method_operator
from stackops_harness.state import build_model, check_schedule


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_json(name):
    cfg = preset(name)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert cfg.block * cfg.stages == cfg.depth
    assert check_schedule(cfg, growth_schedule(cfg))[-1] == cfg.depth


def test_gpu_preset_is_about_100m_parameters():
    cfg = preset("gpu")
    model = eqx.filter_eval_shape(build_model, cfg, jax.random.key(0), cfg.depth)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    assert 90e6 < n < 130e6
    assert cfg.compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(depth=6, stages=4), r"stages=4 does not divide depth=6.*\[1, 2, 3, 6\]"),
        (dict(method="midas+"), r"TrainConfig.method must be a method name or a composition"),
        (dict(total_steps=3, stages=4, depth=4, warmup_steps=0), "every stage needs at least one"),
        (dict(d_model=30, n_heads=4), r"TrainConfig: d_model=30 is not divisible by n_heads=4; "),
        (dict(d_model=24, n_heads=8), r"even head dimension, got 3; change n_heads or use pos="),
        (dict(depth=0, stages=1), r"TrainConfig.depth must be a positive integer, got 0"),
        (dict(seq_len=0), r"TrainConfig.seq_len must be a positive integer"),
        (dict(opt_policy="keep"), r"opt_policy must be one of \['copy', 'zero', 'init'\]"),
        (dict(compute_dtype="float16"), r"compute_dtype must be one of \['float32', 'bfloat16'\]"),
        (dict(attention="flash"), r"attention must be one of \['auto', 'xla', 'cpu-kernel'"),
        (dict(norm=1), r"TrainConfig.norm must be one of \['rms', 'layer'\], got 1"),
        (dict(depth="8"), r"TrainConfig.depth must be a int, got '8'"),
        (dict(warmup_steps=2000), "warmup_steps=2000 exceeds total_steps"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**fields)


def test_unknown_method_names_fail_where_methods_are_resolved(tmp_path, capsys):
    # The registry may grow at run time (register_method), so names are checked where
    # methods are resolved: the schedule (which the trainer builds before any work) and
    # the command line (before any training).
    with pytest.raises(ValueError, match=r"unknown method 'midsa'.*'midas'"):
        growth_schedule(preset("smoke", method="midsa"))
    with pytest.raises(ValueError, match=r"unknown method 'loop' in 'midas\+loop'"):
        growth_schedule(preset("smoke", method="midas+loop"))
    assert train_cli.main(["--preset", "smoke", "--out", str(tmp_path), "--method", "midsa"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'midsa'" in err and "--method" in err


def test_fields_read_by_flat_name_and_by_section():
    cfg = preset("smoke")
    assert (cfg.depth, cfg.model.depth, cfg.lr, cfg.optimiser.lr) == (4, 4, 3e-3, 3e-3)
    assert cfg.replace(model={"depth": 8}) == cfg.replace(depth=8) == preset("smoke", depth=8)
    assert dataclasses.replace(cfg, lr=1e-3) == cfg.replace(lr=1e-3)
    assert cfg.replace(runtime=RuntimeConfig(log_every=3)).log_every == 3
    assert apply_overrides(cfg, ["model.depth=8", "growth.stages=2"]) == cfg.replace(
        depth=8, stages=2
    )
    with pytest.raises(ValueError, match="section 'model' has no field 'lr'"):
        apply_overrides(cfg, ["model.lr=1"])
    with pytest.raises(AttributeError, match="did you mean 'depth'"):
        cfg.detph  # noqa: B018
    with pytest.raises(TypeError, match="unknown field 'detph'.*did you mean 'depth'"):
        TrainConfig(detph=3)


def test_field_metadata_sorts_resumable_and_compiled_fields():
    fields = list(config_fields())
    assert len({f.name for _, f, _ in fields}) == len(fields)  # unique across sections
    assert {s for s, _, _ in fields} == set(SECTIONS)
    for _, f, _ in fields:
        assert f.metadata["help"] and isinstance(f.metadata["help"], str)
        assert isinstance(f.metadata["resumable"], bool)
        assert isinstance(f.metadata["compiled"], bool)
    # The membership of the hand-kept lists these replace, unchanged.
    assert RESUMABLE_FIELDS == {
        "unroll", "attention", "fsdp_min_size", "eval_every", "ckpt_every",
        "keep_checkpoints", "async_checkpoints", "log_every", "progress", "compile_cache",
        "data_dir",
    }
    assert {f.name for _, f, _ in fields} - COMPILED_FIELDS == {
        "method", "stages", "alpha", "interp_t", "seed", "data_seed", "data_dir",
        "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "async_checkpoints",
        "log_every", "progress", "compile_cache",
    }


def test_the_flat_format_of_older_runs_loads_and_compares():
    cfg = preset("smoke", method="gradstack")
    flat = json.loads(json.dumps({**config_to_flat_dict(cfg), "provenance": {}}))
    assert "depth" in flat and "model" not in flat  # format 1: one key per field
    assert config_from_dict(flat) == cfg
    assert config_diff(flat, cfg) == {} and config_diff(config_to_dict(cfg), cfg) == {}
    assert config_diff(flat, cfg.replace(lr=1e-3)) == {"lr": (3e-3, 1e-3)}
    nested = config_to_dict(cfg)
    assert nested["format"] == 2 and nested["growth"]["method"] == "gradstack"
    mixed = {**nested, "depth": 8}
    for bad, match in [
        (mixed, r"mixes sections \(model, .*\) with flat fields \(depth\).*config_to_dict"),
        ({**nested, "format": 3}, "format 3"),
        ({**nested, "model": 4}, r"'model' must be a mapping"),
        ({"model": {"lr": 1.0}}, "'lr' belongs to the 'optimiser' section"),
        ({"dpeth": 4}, "did you mean 'depth'"),
    ]:
        with pytest.raises(ValueError, match=match):
            config_from_dict(bad)
        with pytest.raises(ValueError, match=match):
            config_diff(bad, cfg)


def test_help_shows_each_fields_meaning_and_choices(capsys):
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--opt-policy {copy,zero,init}" in out
    assert "optimizer moments of new layers (default 'copy')" in out
    assert "--attention {auto,xla,cpu-kernel,dot-product}" in out
    assert "may change on resume" in out and "config: growth" in out


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(
        preset("smoke"),
        ["method=gradstack", "preserve=true", "d_ff=128", "alpha=2", "lr=1e-3", "eval-batch=none"],
    )
    assert (cfg.method, cfg.preserve, cfg.d_ff, cfg.alpha, cfg.lr) == (
        "gradstack",
        True,
        128,
        2.0,
        1e-3,
    )
    assert cfg.eval_batch is None and isinstance(cfg.alpha, float)
    with pytest.raises(ValueError, match="did you mean 'd_model'"):
        apply_overrides(cfg, ["d_modle=3"])
    with pytest.raises(ValueError, match="needs a int"):
        apply_overrides(cfg, ["depth=deep"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["depth"])


def test_config_diff_ignores_fields_that_may_change_on_resume():
    saved = config_to_dict(preset("smoke"))
    assert config_diff(saved, preset("smoke", eval_every=5, progress=False, data_dir="x")) == {}
    assert config_diff(saved, preset("smoke", seed=1, lr=1e-3)) == {
        "lr": (3e-3, 1e-3),
        "seed": (0, 1),
    }


def test_method_names_map_to_stackops_operators():
    cfg = preset("cpu")  # block 2
    assert method_operator(cfg) == so.middle_stack(block=2)
    assert method_operator(preset("cpu", method="gradstack")) == so.last_stack(block=2)
    assert method_operator(preset("cpu", method="lidas")) == so.middle_stack(block=2, align="depth")
    assert method_operator(preset("cpu", method="interpolate", interp_t=0.25)) == so.interpolate(
        block=2, t=0.25
    )
    assert method_operator(preset("cpu", method="baseline")) is None
    # A composition by name: a loop step then untie is exactly one MIDAS step.
    looped_untie = method_operator(preset("cpu", method="looped+untie"))
    for depth in (2, 4, 6):
        assert looped_untie.plan(depth).sources() == so.middle_stack(block=2).plan(depth).sources()


def test_growth_schedule_is_prop_alpha_with_one_operator_per_boundary():
    sched = growth_schedule(preset("cpu", alpha=2.0))
    assert sched.lengths == so.prop_schedule(1500, 4, 2.0) and len(sched.ops) == 3
    assert sched.stage_at(0) == 0 and sched.stage_at(sched.starts[3]) == 3
    assert growth_schedule(preset("cpu", method="baseline")).lengths == (1500,)
    ops = [so.middle_stack(block=2), so.last_stack(block=2), so.interpolate(block=2)]
    assert growth_schedule(preset("cpu", method="custom"), op=ops).ops == tuple(ops)
    with pytest.raises(ValueError, match="sequence of 3"):
        growth_schedule(preset("cpu", method="custom"), op=ops[:2])
    with pytest.raises(ValueError, match='set method="custom"'):
        growth_schedule(preset("cpu"), op=ops[0])


def test_methods_that_cannot_grow_this_model_fail_before_training():
    with pytest.raises(ValueError, match=r"depths \[2, 6, 10, 14\].*not TrainConfig.depth=8"):
        check_schedule(
            preset("cpu", method="midas+midas"),
            growth_schedule(preset("cpu", method="midas+midas")),
        )
    cfg = preset("cpu", method="looped", preserve=True)
    with pytest.raises(ValueError, match="cannot grow this model.*share weights"):
        check_schedule(cfg, growth_schedule(cfg))


def test_register_method_adds_a_name():
    methods.register_method("last2", lambda c: so.last_stack(block=c.block))
    try:
        cfg = preset("smoke", method="last2")
        assert check_schedule(cfg, growth_schedule(cfg)) == (1, 2, 3, 4)
    finally:
        del methods._REGISTRY["last2"]
    with pytest.raises(ValueError, match="without '\\+'"):
        methods.register_method("a+b", lambda c: so.untie())


def test_command_line_builds_the_config_from_preset_flags_and_set(tmp_path, capsys):
    args = ["--preset", "smoke", "--out", str(tmp_path), "--depth", "8", "--set", "stages=2"]
    assert train_cli.main([*args, "--method", "gradstack", "--print-config"]) == 0
    printed = config_from_dict(json.loads(capsys.readouterr().out))
    assert (printed.depth, printed.stages, printed.method) == (8, 2, "gradstack")
    # A bad config is one line on stderr and exit status 2, no traceback.
    assert train_cli.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "3"]) == 2
    assert "stages=3 does not divide depth=4" in capsys.readouterr().err


def test_batch_not_divisible_by_the_data_axis_is_rejected(tmp_path):
    proc = run_cli(
        smoke_cli_args(tmp_path / "r", "--set", "global_batch=12"), devices=8, check=False
    )
    assert proc.returncode == 2
    assert "global_batch=12 is not divisible by the data axis (8 devices)" in proc.stderr


def test_every_preset_of_every_program_is_a_valid_config():
    from stackops_harness import presets
    from stackops_harness.cli import looped, midas

    assert PRESETS is presets.TRAIN_PRESETS
    assert midas.PRESETS is presets.MIDAS_PRESETS and looped.PRESETS is presets.LOOPED_PRESETS
    for spec in presets.TRAIN_PRESETS.values():
        TrainConfig(**spec)
    for spec in presets.MIDAS_PRESETS.values():
        TrainConfig(**spec["train"])
    for spec in presets.LOOPED_PRESETS.values():  # depth and stages come from --k, --loops
        TrainConfig(**dict(spec["train"], depth=6, stages=3))
