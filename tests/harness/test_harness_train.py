"""The training loop end to end: a stagewise smoke run, resume equivalence, hooks, methods."""

import json

import numpy as np
import pytest
from harness_support import (
    SMOKE_CHECKPOINTS,
    params_of,
    reference_run,
    smoke,
    train_losses,
    val_losses,
)

import stackops as so
from stackops.models import flops_per_token
from stackops_harness.checkpoint import load_checkpoint
from stackops_harness.config import config_to_dict
from stackops_harness.metrics import read_metrics
from stackops_harness.trainer import train


def test_smoke_run_grows_through_every_stage_and_logs_it():
    result, _ = reference_run()
    cfg = result.config
    assert (result.step, result.stage, result.depth) == (40, 3, 4)
    assert result.model.depth == 4
    records = read_metrics(result.metrics_path)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end"

    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 41))
    # Prop-1 over 40 steps and 4 stages: (4, 8, 12, 16); stage i has i blocks.
    stage_of = {r["step"]: (r["stage"], r["depth"]) for r in train_recs}
    assert stage_of[4] == (1, 1) and stage_of[5] == (2, 2) and stage_of[12] == (2, 2)
    assert stage_of[13] == (3, 3) and stage_of[25] == (4, 4) and stage_of[40] == (4, 4)
    grows = [r for r in records if r["kind"] == "grow"]
    assert [(g["step"], g["depth_from"], g["depth_to"]) for g in grows] == [
        (4, 1, 2),
        (12, 2, 3),
        (24, 3, 4),
    ]
    compiles = [r for r in records if r["kind"] == "compile"]
    assert [c["depth"] for c in compiles] == [1, 2, 3, 4]  # once per stage

    # Cumulative tokens and FLOPs counted from the architecture at each stage.
    assert train_recs[-1]["tokens"] == 40 * cfg.global_batch * cfg.seq_len
    from stackops_harness.state import lm_config

    expected = sum(
        n * cfg.tokens_per_step * flops_per_token(lm_config(cfg, d), d, cfg.seq_len)
        for n, d in zip((4, 8, 12, 16), (1, 2, 3, 4))
    )
    assert train_recs[-1]["flops"] == pytest.approx(expected)
    # Time is split by activity; training time excludes compilation.
    last = records[-1]
    for key in ("time_train", "time_compile", "time_grow", "time_ckpt", "time_eval"):
        assert last[key] >= 0
    assert last["time_compile"] > 0 and last["time_train"] > 0

    vals = val_losses(result.metrics_path)
    assert sorted(vals) == [0, 10, 20, 30, 40]
    assert vals[40] < vals[0] - 0.5  # it learns
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved.pop("provenance")["packages"]["stackops"] == so.__version__
    assert saved == config_to_dict(cfg)
    # The LR schedule ran on the global step: the optimizer's count survived growth.
    assert [r["lr"] for r in train_recs][:4] == pytest.approx([0.0, 7.5e-4, 1.5e-3, 2.25e-3])


def test_checkpoints_hold_each_stage_and_load_at_their_depth():
    """A checkpoint every ckpt_every steps and at every stage boundary (after growing), each
    loading at its stage's depth with the growth history up to it."""
    result, params = reference_run()
    steps = sorted(int(p.name) for p in (result.run_dir / "checkpoints").iterdir())
    assert steps == SMOKE_CHECKPOINTS  # 10, 20, 30, 40 and the boundaries 4, 12, 24
    # Prop-1 over 40 steps: stage i (0-based) starts at (0, 4, 12, 24) with i + 1 blocks; a
    # boundary checkpoint holds the grown model that the next stage trains.
    expected = {4: (1, 2), 10: (1, 2), 12: (2, 3), 20: (2, 3), 24: (3, 4), 30: (3, 4), 40: (3, 4)}
    for step in steps:
        model, config, manifest = load_checkpoint(result.run_dir, step)
        assert config == result.config
        stage, depth = expected[step]
        assert (manifest["step"], manifest["stage"], manifest["depth"]) == (step, stage, depth)
        assert model.depth == depth and len(model.blocks) == depth
        assert [g["depth_to"] for g in manifest["growth"]] == [2, 3, 4][:stage]
    for a, b in zip(params_of(model), params):
        np.testing.assert_array_equal(a, b)


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    """Stop at a stage boundary and mid-stage, resume each time: same losses and parameters
    (bit for bit: the same compiled steps see the same data in the same order)."""
    result, ref_params = reference_run()
    run_dir = tmp_path / "resumed"
    first = train(smoke(), run_dir, stop_after=12)  # the boundary into stage 3
    assert (first.step, first.stage, first.depth) == (12, 2, 3)
    second = train(smoke(), run_dir, stop_after=17)
    assert (second.step, second.stage) == (17, 2)
    final = train(smoke(), run_dir)
    assert final.step == 40

    assert train_losses(run_dir / "metrics.jsonl") == train_losses(result.metrics_path)
    assert val_losses(run_dir / "metrics.jsonl") == val_losses(result.metrics_path)
    for a, b in zip(params_of(final.model), ref_params):
        np.testing.assert_array_equal(a, b)
    kinds = [r["kind"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert kinds.count("resume") == 2 and kinds.count("start") == 1


def test_a_finished_run_refuses_resume_false(tmp_path):
    result, _ = reference_run()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(result.config, result.run_dir, resume=False)


def test_eval_hook_sees_the_model_and_adds_to_the_record(tmp_path):
    seen = []

    def hook(step, model, record):
        seen.append((step, model.depth, record["val_loss"]))
        return {"depth_seen": model.depth}

    # Runs that share the smoke config's shapes and optimizer reuse its compiled steps, so
    # these tests stop early (stop_after) rather than shrink total_steps.
    result = train(smoke(eval_every=4), tmp_path / "h", on_eval=hook, stop_after=8)
    assert [s for s, _, _ in seen] == [0, 4, 8]
    # Evaluation at a boundary (step 4) comes before growth: it scores the stage that ended.
    assert [d for _, d, _ in seen] == [1, 1, 2]
    evals = read_metrics(result.metrics_path, "eval")
    assert [r["depth_seen"] for r in evals] == [1, 1, 2]
    assert [r["val_loss"] for r in evals] == [v for _, _, v in seen]


def test_custom_operator_run_and_its_checkpoint(tmp_path):
    op = so.interpolate(block=1, t=0.25)
    res = train(smoke(method="custom"), tmp_path / "custom", op=op, stop_after=5)
    assert res.depth == 2
    assert res.manifest["ops"] == [repr(op)] * 3
    with pytest.raises(ValueError, match="needs its operator"):
        load_checkpoint(tmp_path / "custom")
    model, _, _ = load_checkpoint(tmp_path / "custom", op=op)
    assert model.depth == 2
    with pytest.raises(ValueError, match="grown with the operators"):
        load_checkpoint(tmp_path / "custom", op=so.interpolate(block=1, t=0.5))


def test_baseline_trains_the_final_depth_from_the_start(tmp_path):
    base = train(smoke(method="baseline"), tmp_path / "base", stop_after=2)
    recs = read_metrics(base.metrics_path, "train")
    assert {r["depth"] for r in recs} == {4} and {r["stage"] for r in recs} == {1}
    assert not read_metrics(base.metrics_path, "grow")


def test_looped_method_trains_a_weight_tied_model(tmp_path):
    res = train(smoke(method="looped"), tmp_path / "l", stop_after=5)
    blocks = res.model.blocks
    assert len(blocks) == 2 and blocks.num_layers == 1 and blocks.is_tied
    model, _, manifest = load_checkpoint(tmp_path / "l")
    assert model.blocks.order == blocks.order and manifest["depth"] == 2
    for a, b in zip(params_of(model), params_of(res.model)):
        np.testing.assert_array_equal(a, b)


def test_evaluate_model_scores_a_loaded_model_like_the_run_did():
    from harness_support import token_dir

    from stackops_harness import data
    from stackops_harness.evaluate import evaluate_model

    result, _ = reference_run()
    cfg = result.config
    val = data.load_tokens(token_dir() / "val.bin")
    batches = data.make_eval_batches(
        val, seq_len=cfg.seq_len, batch=cfg.eval_rows, num_batches=cfg.eval_batches
    )
    model, _, _ = load_checkpoint(result.run_dir)
    assert evaluate_model(model, batches) == pytest.approx(result.val_loss, rel=1e-6)


def test_bf16_compute_gives_a_close_float32_loss():
    from stackops_harness.evaluate import next_token_loss

    result, _ = reference_run()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
    full = next_token_loss(result.model, tokens)
    half = next_token_loss(result.model, tokens, compute_dtype="bfloat16")
    assert half.dtype == np.float32
    assert float(half) == pytest.approx(float(full), abs=0.05)


def test_resuming_a_finished_run_returns_its_model_and_last_val_loss():
    result, params = reference_run()
    again = train(result.config, result.run_dir)
    assert (again.step, again.depth) == (40, 4) and again.val_loss == result.val_loss
    for a, b in zip(params_of(again.model), params):
        np.testing.assert_array_equal(a, b)
