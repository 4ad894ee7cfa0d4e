"""The training config, growth methods and command line: presets, overrides, bad configs."""

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
    PRESETS,
    TrainConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
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
        (dict(method="midsa"), r"unknown method 'midsa'.*'midas'"),
        (dict(method="midas+loop"), r"unknown method 'loop' in 'midas\+loop'"),
        (dict(total_steps=3, stages=4, depth=4, warmup_steps=0), "every stage needs at least one"),
        (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
        (dict(opt_policy="keep"), r"opt_policy must be one of \['copy', 'zero', 'init'\]"),
        (dict(compute_dtype="float16"), "compute_dtype"),
        (dict(depth="8"), r"TrainConfig.depth must be a int, got '8'"),
        (dict(warmup_steps=2000), "warmup_steps=2000 exceeds total_steps"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**fields)


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
    printed = json.loads(capsys.readouterr().out)
    assert (printed["depth"], printed["stages"], printed["method"]) == (8, 2, "gradstack")
    # A bad config is one line on stderr and exit status 2, no traceback.
    assert train_cli.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "3"]) == 2
    assert "stages=3 does not divide depth=4" in capsys.readouterr().err


def test_batch_not_divisible_by_the_data_axis_is_rejected(tmp_path):
    proc = run_cli(
        smoke_cli_args(tmp_path / "r", "--set", "global_batch=12"), devices=8, check=False
    )
    assert proc.returncode == 2
    assert "global_batch=12 is not divisible by the data axis (8 devices)" in proc.stderr
