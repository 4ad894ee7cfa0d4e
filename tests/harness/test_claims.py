"""The MIDAS comparison's verdicts (stackops_harness/claims.py) on constructed runs."""

import math

import pytest

from stackops_harness.claims import LOSS_MARGIN, analyse


def _run(loss, reason, recall, *, flops=1.0, slope=-1.0):
    """A run whose accuracy rises as its loss falls (three evaluations)."""
    pts = [{"val_loss": loss + d, "math": reason + slope * d, "recall": recall + slope * d}
           for d in (0.2, 0.1, 0.0)]
    return {"val_loss": loss, "flops": flops, "train_seconds": 10.0, "step_seconds": 9.0,
            "eval_share": 0.1, "tf": {"math": reason, "recall": recall}, "points": pts,
            "curve": [(flops * 0.5, loss + 0.1), (flops, loss)], "greedy": {}}


def _analyse(runs):
    return analyse(runs, tasks=["math", "recall"], reasoning_tasks=["math"],
                   recall_tasks=["recall"], ideal_speedup=1.385)


BASE = [(2.00, 0.30, 0.20), (2.05, 0.25, 0.22), (1.98, 0.33, 0.19), (2.02, 0.28, 0.21)]


def test_a_clearly_better_midas_is_supported_on_every_claim():
    runs = {
        "baseline": {s: _run(v, a, r, flops=1.36) for s, (v, a, r) in enumerate(BASE)},
        "gradstack": {s: _run(v + 0.05 + 0.003 * s, a, r) for s, (v, a, r) in enumerate(BASE)},
        "midas": {s: _run(v - 0.01 + 0.002 * s, a + 0.1 + 0.01 * s, r)
                  for s, (v, a, r) in enumerate(BASE)},
    }
    out = _analyse(runs)
    assert {k: c["verdict"] for k, c in out["claims"].items()} == {
        "1": "supported", "2": "supported", "3": "supported", "4": "supported"}
    assert out["methods"]["midas"]["flops_speedup"] == pytest.approx(1.36)
    assert not math.isnan(out["common_loss"])


def test_a_worse_midas_is_contradicted_and_noise_is_not_established():
    worse = {
        "baseline": {s: _run(v, a, r) for s, (v, a, r) in enumerate(BASE)},
        "gradstack": {s: _run(v - 0.05 - 0.003 * s, a, r) for s, (v, a, r) in enumerate(BASE)},
        "midas": {s: _run(v + LOSS_MARGIN + 0.05 + 0.002 * s, a - 0.1 - 0.01 * s, r)
                  for s, (v, a, r) in enumerate(BASE)},
    }
    claims = _analyse(worse)["claims"]
    assert claims["1"]["verdict"] == "contradicted"
    assert claims["2"]["verdict"] == "contradicted"  # no FLOPs saved and a worse loss
    noisy = {
        "baseline": {s: _run(v, a, r) for s, (v, a, r) in enumerate(BASE)},
        "midas": {s: _run(v + (0.03 if s % 2 else -0.03), a + (0.05 if s % 2 else -0.05), r)
                  for s, (v, a, r) in enumerate(BASE)},
    }
    claims = _analyse(noisy)["claims"]
    assert claims["3"]["verdict"] == "not established"
    assert claims["1"] == {"verdict": "not established", "evidence": "needs gradstack runs"}


def test_claim_4_subtracts_the_recall_gain():
    # MIDAS gains more on recall than on reasoning: the reasoning gain alone is no claim 4.
    runs = {
        "baseline": {s: _run(v, a, r) for s, (v, a, r) in enumerate(BASE)},
        "midas": {s: _run(v, a + 0.1 + 0.01 * s, r + 0.12 + 0.01 * s)
                  for s, (v, a, r) in enumerate(BASE)},
    }
    claims = _analyse(runs)["claims"]
    assert claims["3"]["verdict"] == "supported"
    assert claims["4"]["verdict"] == "contradicted"
    assert claims["4"]["numbers"]["mean"] == pytest.approx(-0.02)


def _narrow(loss, reason, recall):
    """A run whose primitive evaluations span almost no loss (as at the end of training)."""
    pts = [{"val_loss": loss + d, "math": reason, "recall": recall} for d in (0.002, 0.0)]
    return {"val_loss": loss, "flops": 1.0, "train_seconds": 10.0, "step_seconds": 9.0,
            "eval_share": 0.1, "tf": {"math": reason, "recall": recall}, "points": pts,
            "curve": [(1.0, loss)], "greedy": {}}


@pytest.mark.parametrize("gain, verdict", [(0.08, "supported"), (0.0, "not established")])
def test_without_a_common_loss_claim_3_compares_at_equal_loss_by_paired_regression(
        gain, verdict):
    """MIDAS ends at a higher loss in every seed, and accuracy falls with loss (slope -2):
    its raw accuracy is lower, but at equal loss it is `gain` better. The regression of the
    per-seed differences finds the gain; with none, nothing is established."""
    base = [(2.00, 0.30, 0.20), (2.05, 0.25, 0.22), (1.98, 0.33, 0.19), (2.02, 0.28, 0.21),
            (2.01, 0.29, 0.20), (1.99, 0.31, 0.21)]
    noise = [0.004, -0.003, 0.002, -0.004, 0.001, 0.0]
    runs = {"baseline": {s: _narrow(v, a, r) for s, (v, a, r) in enumerate(base)},
            "midas": {}}
    for s, (v, a, r) in enumerate(base):
        dl = 0.05 + 0.01 * s
        runs["midas"][s] = _narrow(v + dl, a - 2.0 * dl + gain + noise[s], r - 2.0 * dl)
    out = _analyse(runs)
    assert math.isnan(out["common_loss"])
    c3 = out["claims"]["3"]
    assert c3["verdict"] == verdict and "equal loss" in c3["test"]
    assert c3["numbers"]["mean"] == pytest.approx(gain, abs=0.01)
    assert c3["numbers"]["ddof"] == 2
    # Raw accuracy is lower for MIDAS in every seed: only the loss adjustment shows the gain.
    assert all(runs["midas"][s]["tf"]["math"] < runs["baseline"][s]["tf"]["math"] + gain
               for s in range(len(base)))
    # Claim 4 subtracts recall, which here follows loss with no gain of its own.
    assert out["claims"]["4"]["numbers"]["mean"] == pytest.approx(gain, abs=0.01)
