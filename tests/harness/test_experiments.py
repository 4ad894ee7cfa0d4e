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


def test_suite_scores_a_model_like_per_example_teacher_forcing(tiny_model):
    from stackops_harness import primitives as P
    from stackops_harness.reasoning import PrimitiveEvalConfig, PrimitiveSuite, _logits

    cfg = PrimitiveEvalConfig(tasks=("math", "recall", "varassign_d1"), n_eval=12, max_len=64)
    suite = PrimitiveSuite(cfg)
    assert suite.shots == {t: P.shots_that_fit(t, 64) for t in cfg.tasks}
    hits = suite.hits(tiny_model)
    for t in cfg.tasks:  # the bucketed, batched scoring equals scoring each task alone
        alone = P.teacher_forced_exact_match(
            lambda x: _logits(tiny_model, x), suite.prompts[t],
            [e.answer for e in suite.examples[t]], max_len=64, batch_size=5)
        assert hits[t].tolist() == alone.tolist()
    with pytest.raises(ValueError, match="shots of 'varassign_d2' do not fit"):
        PrimitiveEvalConfig(tasks=("varassign_d2",), shots=5, max_len=128)
    with pytest.raises(ValueError, match="cannot hold one"):
        PrimitiveEvalConfig(tasks=("varassign_d2",), max_len=32)


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
    assert set(tokens) == set(weights) | {"induction", "varassign_d0", "varassign_d2", "recall"}
    assert tokens["induction"] == tokens["varassign_d0"] == tokens["varassign_d2"] == 0
    assert tokens["recall"] == 0
    assert 2.5 < tokens["math"] / tokens["varassign_d1"] < 3.5
    syn = meta["synthetic_tokens"]
    assert 0.2 < meta["copy_tokens"] / syn < 0.3
    text = data.decode(data.load_tokens(tmp_path / "train.bin"))
    line = next(ln for ln in text.splitlines() if " | " in ln and "=" not in ln)
    first, second = line.split(" | ")
    assert first == second  # a copy document: the same items twice
    assert meta["math_kind_shares"] and set(meta["math_kind_shares"]) == {"2", "3"}


def test_recall_facts_are_in_the_training_text_and_eval_prompts_of_other_tasks_are_not(
        tmp_path):
    from stackops_harness import data
    from stackops_harness import primitives as P
    from stackops_harness.corpus import EVAL_EXCLUDE, build_mixed_corpus

    build_mixed_corpus(tmp_path, max_mb=0.2, synthetic_fraction=0.5,
                       task_weights={"recall": 1.0, "varassign_d1": 1.0})
    lines = set(data.decode(data.load_tokens(tmp_path / "train.bin")).splitlines())
    facts = {f"{e.prompt}{e.answer}" for e in P.recall_table()}
    assert len(facts & lines) > 0.9 * len(facts)  # closed book: the facts are in the text
    held_out = {f"{e.prompt}{e.answer}" for e in P.generate("varassign_d1", 1000, seed=0)}
    assert EVAL_EXCLUDE.get("varassign_d1", 1000) == 1000
    assert not held_out & lines  # no evaluation prompt of a reasoning task


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
    assert "## Verdicts" in report and "*floor*" in report and "95% CI" in report
    assert set(res["claims"]) == {"1", "2", "3", "4"}
    assert all(c["verdict"] in ("supported", "contradicted", "not established")
               for c in res["claims"].values())
    assert res["shots"]["math"] == 5 and res["floors"]["varassign_d1"]["shortcut"] is not None
    # Reusing finished runs: a second call trains nothing and rebuilds the same verdicts.
    again = midas.main(
        ["--preset", "smoke", "--no-progress", "--out", str(tmp_path)]
    )
    assert {k: c["verdict"] for k, c in again["claims"].items()} == {
        k: c["verdict"] for k, c in summary["claims"].items()}
    assert again["methods"]["midas"]["val_loss"] == summary["methods"]["midas"]["val_loss"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "midsa"], "unknown method 'midsa'"),
        (["--methods", "midas,midas"], "twice"),
        (["--methods", ""], "empty"),
        (["--ablation", "opt_polcy=zero"], "Unknown config field 'opt_polcy'"),
        (["--set", "depth=7"], "does not divide"),
        (["--seeds", "2", "--seed-list", "5"], "--seed-list"),
        (["--task-weights", "algebra=1"], "unknown tasks"),
        (["--tf-evals", "0"], "--tf-evals"),
    ],
)
def test_midas_rejects_bad_arguments_before_any_work(tmp_path, capsys, argv, match):
    from stackops_harness.cli import midas

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        midas.main(["--preset", "smoke", "--out", str(out), *argv])
    message = str(e.value)
    assert match in message and "\n" not in message and "Traceback" not in message
    assert not out.exists()  # nothing built, nothing trained


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


GRAIN_BLOCKED = (
    "import sys\n"
    "for name in ('grain', 'orbax', 'orbax.checkpoint'):\n"
    "    sys.modules[name] = None  # any import of them now fails\n"
    "from stackops_harness.cli import gpu_run\n"
    "gpu_run.main(sys.argv[1:])\n"
    "assert sys.modules['grain'] is None\n"
)


def test_gpu_run_works_at_tiny_size_without_grain_or_orbax(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-c", GRAIN_BLOCKED, "--tiny", "--out", str(out),
         "--methods", "baseline,midas", "--steps", "20", "--n-eval", "8"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"baseline", "midas"}
    assert len(res["methods"]["midas"]["val_loss"]) == 2  # two vmapped seeds
    assert res["methods"]["midas"]["flops_speedup"] > 1.0
    assert res["mfu"]["step_seconds"] > 0 and res["mfu"]["peak_tflops"] == 989.0
    for name in ("report.md", "mfu.json", "timings.json", "history.json"):
        assert (out / name).stat().st_size > 0
    assert "## Verdicts" in (out / "report.md").read_text()
