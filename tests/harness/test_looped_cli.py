"""The looped comparison: seeds, its own learning rate, paired statistics, bad arguments."""

import json

import pytest

from stackops_harness.cli import looped


def test_looped_smoke_with_two_seeds_reports_paired_comparisons(tmp_path):
    out = tmp_path / "looped"
    summary = looped.main(["--preset", "smoke", "--seeds", "2", "--looped-lr", "0.006",
                           "--lr", "0.004", "--models", "looped,iso-param", "--no-finetune",
                           "--no-progress", "--out", str(out)])
    runs = summary["runs"]
    assert set(runs) == {"looped (2⊗3)", "iso-param (2 layers)"}
    assert all(set(r) == {"0", "1"} for r in runs.values())
    # Seeds differ (init and data order) and the looped model's runs carry its own LR.
    lo = runs["looped (2⊗3)"]
    assert lo["0"]["val_loss"] != lo["1"]["val_loss"]
    assert (out / "looped-lr0.006-seed1" / "final_eval.json").is_file()
    assert (out / "iso-param-lr0.004-seed1" / "final_eval.json").is_file()
    saved = json.loads((out / "looped-lr0.006-seed0" / "config.json").read_text())
    assert json.dumps(saved).count("0.006") >= 1
    comp = summary["comparisons"]["looped - iso-param: val loss"]
    assert comp["n"] == 2 and comp["verdict"] in ("supported", "contradicted", "not established")
    d = lo["0"]["val_loss"] - runs["iso-param (2 layers)"]["0"]["val_loss"]
    d1 = lo["1"]["val_loss"] - runs["iso-param (2 layers)"]["1"]["val_loss"]
    assert comp["mean"] == pytest.approx((d + d1) / 2)
    assert summary["lr"] == 0.004 and summary["looped_lr"] == 0.006
    report = (out / "report.md").read_text()
    assert "Paired by seed" in report and "ddof=1" in report
    # A second call reuses the finished runs and reports the same numbers.
    again = looped.main(["--preset", "smoke", "--seeds", "2", "--looped-lr", "0.006",
                         "--lr", "0.004", "--models", "looped,iso-param", "--no-finetune",
                         "--no-progress", "--out", str(out)])
    assert again["comparisons"] == summary["comparisons"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--models", "looped,foo"], "unknown"),
        (["--seeds", "0"], "--seeds"),
        (["--looped-lr", "inf"], "--looped-lr"),
        (["--lr", "-1"], "--lr"),
        (["--model-lr", "iso-flop"], "--model-lr"),
        (["--model-lr", "deep=0.1"], "--model-lr"),
        (["--loops", "1"], "--loops"),
    ],
)
def test_looped_rejects_bad_arguments_before_any_work(tmp_path, argv, match):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=match):
        looped.main(["--preset", "smoke", "--out", str(out), *argv])
    assert not out.exists()
