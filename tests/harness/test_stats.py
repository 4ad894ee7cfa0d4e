"""Tests of stackops_harness/stats.py against published values."""

import doctest
import math

import numpy as np
import pytest

from stackops_harness import stats as S

# Student's sleep data (Cushny & Peebles 1905), the classic paired t-test: R's
# t.test(extra ~ group, paired = TRUE) gives t = -4.0621, df = 9, p = 0.002833,
# 95% CI (-2.4598858, -0.7001142), mean difference -1.58.
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


@pytest.mark.parametrize(
    "q, df, expected",
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 10, 2.2281), (0.975, 30, 2.0423),
     (0.95, 5, 2.0150), (0.8, 15, 0.8662)],
)
def test_t_quantile_matches_the_table(q, df, expected):
    assert S.t_quantile(q, df) == pytest.approx(expected, abs=1e-4)


def test_paired_matches_students_sleep_data():
    r = S.paired(DRUG1, DRUG2)
    assert r.n == 10 and r.seeds == tuple(range(10))
    assert r.mean == pytest.approx(-1.58)
    assert r.t == pytest.approx(-4.0621, abs=1e-4)
    assert r.p == pytest.approx(0.002833, abs=1e-6)
    assert r.ci == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)
    # The SD is the sample SD of the differences (ddof=1), not the population SD.
    d = np.subtract(DRUG1, DRUG2)
    assert r.sd == pytest.approx(np.std(d, ddof=1)) and r.sd != pytest.approx(np.std(d))
    assert S.verdict(r, claim="a < b") == "supported"
    assert S.verdict(r, claim="a > b") == "contradicted"


def test_paired_pairs_by_seed_not_by_position():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 5: 100.0}
    b = {2: 1.0, 1: 0.5, 0: 0.0, 7: -3.0}
    r = S.paired(a, b)
    assert r.seeds == (0, 1, 2) and r.mean == pytest.approx(1.5)
    assert S.paired([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0]).n == 2


def test_paired_with_one_pair_establishes_nothing():
    r = S.paired([1.0], [0.0])
    assert r.n == 1 and math.isnan(r.p) and math.isnan(r.ci[0])
    assert S.verdict(r, claim="a > b") == "not established"


def test_paired_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        S.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no seed in common"):
        S.paired({0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="`level`"):
        S.paired([1.0, 2.0], [1.0, 1.0], level=1.5)


def test_verdict_is_not_established_when_the_interval_covers_zero():
    r = S.paired([0.1, -0.2, 0.3, -0.1], [0.0, 0.0, 0.0, 0.0])
    assert r.ci[0] < 0 < r.ci[1]
    assert S.verdict(r, claim="a > b") == S.verdict(r, claim="a < b") == "not established"
    assert S.verdict(r, claim="|a-b| < 10") == "supported"
    assert S.verdict(r, claim="|a-b| < 0.01") == "not established"
    with pytest.raises(ValueError, match="`claim`"):
        S.verdict(r, claim="a >> b")


def test_mean_sd_uses_ddof_1():
    mean, sd = S.mean_sd([2, 4, 4, 4, 5, 5, 7, 9])  # population SD 2, sample SD 2.138
    assert mean == 5.0 and sd == pytest.approx(2.1380899)
    assert math.isnan(S.mean_sd([3.0])[1])


def test_accuracy_at_loss_interpolates_and_never_extrapolates():
    assert S.accuracy_at_loss([2.0, 1.8, 1.6], [0.2, 0.3, 0.4], 1.7) == pytest.approx(0.35)
    # A least-squares line, not the nearest point.
    assert S.accuracy_at_loss([2.0, 1.9, 1.8], [0.0, 0.3, 0.0], 1.9) == pytest.approx(0.1)
    assert math.isnan(S.accuracy_at_loss([2.0, 1.8], [0.2, 0.3], 1.5))
    assert math.isnan(S.accuracy_at_loss([2.0, 2.0], [0.2, 0.3], 2.0))


def test_detectable_difference_shrinks_with_seeds():
    d8, d16 = S.detectable_difference(1.0, 8), S.detectable_difference(1.0, 16)
    assert d16 < d8
    # n = 16, alpha 0.05, power 0.8: (t_.975,15 + t_.8,15) / 4 = (2.1314 + 0.8662) / 4.
    assert d16 == pytest.approx((2.1314 + 0.8662) / 4, abs=1e-3)


def test_docstring_examples_run():
    result = doctest.testmod(S)
    assert result.attempted > 0 and result.failed == 0


def test_paired_at_equal_loss_matches_a_reference_regression():
    from scipy import stats as st

    from stackops_harness.stats import paired_at_equal_loss

    d_loss = {0: 0.01, 1: 0.05, 2: -0.02, 3: 0.03, 4: 0.00, 5: 0.04}
    d_acc = {s: 0.07 - 1.5 * x + 0.01 * (-1) ** s for s, x in d_loss.items()}
    r = paired_at_equal_loss(d_acc, d_loss)
    ref = st.linregress([d_loss[s] for s in range(6)], [d_acc[s] for s in range(6)])
    assert r.mean == pytest.approx(ref.intercept)
    assert r.se == pytest.approx(ref.intercept_stderr)
    t = ref.intercept / ref.intercept_stderr
    assert r.p == pytest.approx(2 * st.t.sf(abs(t), 4))
    assert r.ci[0] < r.mean < r.ci[1] and r.ddof == 2 and r.n == 6
    assert "(ddof=2)" in r.summary()
    # Too few seeds, or no spread in the loss differences: nothing to fit.
    assert math.isnan(paired_at_equal_loss({0: 0.1, 1: 0.2}, {0: 0.0, 1: 0.1}).p)
    assert math.isnan(paired_at_equal_loss({0: 0.1, 1: 0.2, 2: 0.3},
                                           {0: 0.1, 1: 0.1, 2: 0.1}).p)
    with pytest.raises(ValueError, match="no seed in common"):
        paired_at_equal_loss({0: 0.1}, {1: 0.1})
