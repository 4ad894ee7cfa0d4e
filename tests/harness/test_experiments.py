"""The main job end to end (smoke preset), and the evaluation helpers it is built from."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

import stackops as so
from stackops.models import DecoderLM, LMConfig


@pytest.fixture(scope="module")
def tiny_model():
    return DecoderLM(LMConfig(d_model=16, n_heads=2, n_layers=2, max_len=64), key=jax.random.key(0))


def test_layer_similarity_sees_midas_copies_as_identical(tiny_model):
    from stackops_harness.reasoning import layer_similarity

    grown = so.grow(tiny_model, so.middle_stack(block=1), where=lambda m: m.blocks)
    sim = layer_similarity(grown.blocks)
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-6)
    assert abs(sim[0, 1] - 1.0) < 1e-6  # the copy of block 1 sits next to it
    assert sim[0, 2] < 0.5  # independent random blocks are far apart
    unstacked = layer_similarity(so.unstack(grown.blocks))
    np.testing.assert_allclose(unstacked, sim, rtol=1e-5, atol=1e-6)


def test_few_shot_and_finetune_evaluations_return_accuracies(tiny_model):
    from stackops_harness.reasoning import PrimitiveEvalConfig, few_shot_accuracy, finetune_accuracy

    cfg = PrimitiveEvalConfig(
        tasks=("math", "varassign_d0"), n_eval=6, max_len=64, ft_steps=2, ft_runs=2, ft_batch=4
    )
    few = few_shot_accuracy(tiny_model, cfg)
    assert set(few) == {"math", "varassign_d0"} and all(0.0 <= a <= 1.0 for a in few.values())
    ft = finetune_accuracy(tiny_model, cfg)
    assert len(ft["math"]["runs"]) == 2
    assert ft["math"]["mean"] == pytest.approx(np.mean(ft["math"]["runs"]))


def test_informed_guess_is_above_uniform_chance_where_candidates_are_visible():
    from stackops_harness.primitives import chance_accuracy
    from stackops_harness.reasoning import informed_guess_accuracy

    for task in ("varassign_d0", "varassign_d2", "induction"):
        assert informed_guess_accuracy(task, n_eval=50) > chance_accuracy(task)


def test_mixed_corpus_has_the_requested_synthetic_share_and_real_validation(tmp_path):
    from stackops_harness import data
    from stackops_harness.corpus import build_mixed_corpus

    meta = build_mixed_corpus(tmp_path, max_mb=0.3, synthetic_fraction=0.4)
    assert 0.35 < meta["synthetic_fraction_actual"] < 0.45
    val = data.decode(data.load_tokens(tmp_path / "val.bin")[:5000])
    assert "=?" not in val  # validation is real text only
    again = build_mixed_corpus(tmp_path, max_mb=0.3, synthetic_fraction=0.4)
    assert again == meta  # reused, not rebuilt


def test_mixed_corpus_follows_task_weights_and_copy_share(tmp_path):
    from stackops_harness import data
    from stackops_harness.corpus import build_mixed_corpus

    weights = {"math": 3.0, "varassign_d1": 1.0}
    meta = build_mixed_corpus(
        tmp_path, max_mb=0.2, synthetic_fraction=0.5, copy_share=0.25, task_weights=weights
    )
    tokens = meta["task_tokens"]
    assert set(tokens) == set(weights) | {"induction", "varassign_d0", "varassign_d2"}
    assert tokens["induction"] == tokens["varassign_d0"] == tokens["varassign_d2"] == 0
    assert 2.5 < tokens["math"] / tokens["varassign_d1"] < 3.5
    syn = meta["synthetic_tokens"]
    assert 0.2 < meta["copy_tokens"] / syn < 0.3
    text = data.decode(data.load_tokens(tmp_path / "train.bin"))
    line = next(ln for ln in text.splitlines() if " | " in ln and "=" not in ln)
    first, second = line.split(" | ")
    assert first == second  # a copy document: the same items twice


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task_weights={"algebra": 1.0}), "unknown tasks"),
        (dict(task_weights={"math": -1.0}), "must be >= 0"),
        (dict(task_weights={"math": 0.0}), "not all zero"),
        (dict(copy_share=1.5), "copy_share"),
        (dict(synthetic_fraction=0.95), "synthetic_fraction"),
    ],
)
def test_mixed_corpus_rejects_bad_settings(tmp_path, kwargs, match):
    from stackops_harness.corpus import build_mixed_corpus

    with pytest.raises(ValueError, match=match):
        build_mixed_corpus(tmp_path, max_mb=0.1, **kwargs)
    assert not (tmp_path / "train.bin").exists()


def test_corpus_dir_depends_on_every_setting():
    from stackops_harness.corpus import MIX, corpus_dir

    a = corpus_dir("data", dict(MIX, max_mb=20.0))
    assert a == corpus_dir("data", dict(max_mb=20.0, **MIX))  # key order does not matter
    assert a != corpus_dir("data", dict(MIX, max_mb=2.0))
    assert a != corpus_dir("data", dict(MIX, max_mb=20.0, copy_share=0.1))


def test_midas_smoke_run_writes_report_plots_and_results(tmp_path):
    from stackops_harness.cli import midas

    summary = midas.main(
        ["--preset", "smoke", "--no-finetune", "--no-progress", "--out", str(tmp_path)]
    )
    assert set(summary["methods"]) == {"baseline", "gradstack", "midas"}
    for name in (
        "report.md",
        "results.json",
        "config.json",
        "loss_vs_flops_and_time.png",
        "primitives_vs_loss.png",
        "layer_similarity.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"]["baseline"]["flops_speedup"] == pytest.approx(1.0)
    # Growth methods train fewer FLOPs than the baseline, by what the schedule predicts.
    assert res["methods"]["midas"]["flops_speedup"] > 1.1
    report = (tmp_path / "report.md").read_text()
    assert "| midas |" in report and "ideal" in report.lower()


def test_bench_train_step_section_runs_on_a_tiny_model(capsys):
    from stackops_harness.cli import bench_train

    out = bench_train.main(
        ["--preset", "smoke", "--quick", "--skip", "compile,stages,run", "--threads", "1"]
    )
    steps = out["steps"]
    assert "jax: harness step, unrolled, xla attention" in steps
    if shutil.which(os.environ.get("CXX", "g++")):  # the CPU kernel can be built
        assert "jax: harness step, unrolled, cpu-kernel attention" in steps
        assert steps["kernel_speedup"] > 0
    assert all(v["ms"] > 0 for k, v in steps.items() if isinstance(v, dict))
    assert np.isfinite(steps["attention_core_ms"])
    printed = capsys.readouterr().out
    assert "Attention core" in printed and "Train-step throughput" in printed
