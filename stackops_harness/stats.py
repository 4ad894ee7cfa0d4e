"""Statistics that decide: paired comparisons by seed, verdicts, accuracy at a common loss.

Every comparison of two methods pairs their runs by seed (the same data order and
initialisation seed), so the seed's own effect cancels. [`paired`][] gives the mean
difference, the sample standard deviation of the differences (ddof=1), the 95% confidence
interval from the t-distribution with `n - 1` degrees of freedom and the two-sided p-value;
[`verdict`][] turns that into *supported*, *contradicted* or *not established*. The t
quantiles come from SciPy, which JAX itself requires (so it is present wherever the harness
runs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

__all__ = [
    "Paired",
    "paired",
    "paired_at_equal_loss",
    "verdict",
    "mean_sd",
    "t_quantile",
    "accuracy_at_loss",
    "detectable_difference",
]

VERDICTS = ("supported", "contradicted", "not established")
"""The three possible verdicts of a claim."""


def t_quantile(q: float, df: float) -> float:
    """The `q`-quantile of Student's t-distribution with `df` degrees of freedom.

    !!! Example

        >>> round(t_quantile(0.975, 10), 4)
        2.2281
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"`q` must lie in (0, 1), got {q}.")
    if not df > 0:
        raise ValueError(f"`df` must be > 0, got {df}.")
    return float(_st.t.ppf(q, df))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; `nan` for fewer than two values).

    !!! Example

        >>> mean_sd([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        raise ValueError("`values` is empty.")
    sd = float(np.std(arr, ddof=1)) if arr.size > 1 else float("nan")
    return float(np.mean(arr)), sd


@dataclasses.dataclass(frozen=True)
class Paired:
    """A paired comparison `a - b` over seeds (see [`paired`][]).

    **Attributes:** `n` (pairs), `mean` (mean difference), `sd` (sample SD of the
    differences, ddof=1), `se` (`sd / sqrt(n)`), `ci` (the confidence interval of the mean
    difference), `level` (its confidence level), `t` (the t statistic), `p` (two-sided
    p-value), `seeds` (the seeds paired).
    """

    n: int
    mean: float
    sd: float
    se: float
    ci: tuple[float, float]
    level: float
    t: float
    p: float
    seeds: tuple[int, ...]
    ddof: int = 1

    def summary(self, digits: int = 3) -> str:
        """`"+0.012 [95% CI -0.003, +0.027], p = 0.11, SD 0.015 (ddof=1), n = 8"`."""
        f = f"{{:+.{digits}f}}"
        return (f"{f.format(self.mean)} [{self.level:.0%} CI {f.format(self.ci[0])}, "
                f"{f.format(self.ci[1])}], p = {self.p:.2g}, SD {self.sd:.{digits}f} "
                f"(ddof={self.ddof}), n = {self.n}")


def paired(
    a: Sequence[float] | dict[int, float],
    b: Sequence[float] | dict[int, float],
    *,
    level: float = 0.95,
) -> Paired:
    """Paired t-comparison of `a - b`, pairing by seed.

    **Arguments:**

    - `a`, `b`: per-seed values, as dicts `{seed: value}` (pairs are the seeds in both) or
      as equal-length sequences (index = seed). `None` and `nan` entries drop their pair.
    - `level`: confidence level of the interval.

    **Returns:** a [`Paired`][]. With one pair the SD, interval and p-value are `nan`.

    !!! Example

        >>> r = paired([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
        >>> r.mean, round(r.sd, 3), round(r.p, 4), [round(x, 3) for x in r.ci]
        (1.5, 0.5, 0.0351, [0.258, 2.742])
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must lie in (0, 1), got {level}.")
    da = a if isinstance(a, dict) else dict(enumerate(a))
    db = b if isinstance(b, dict) else dict(enumerate(b))
    if not isinstance(a, dict) and not isinstance(b, dict) and len(da) != len(db):
        raise ValueError(f"`a` ({len(da)}) and `b` ({len(db)}) must have the same length; "
                         "pass dicts {seed: value} to pair by seed.")

    def ok(v: float | None) -> bool:
        return v is not None and not math.isnan(float(v))

    seeds = tuple(sorted(s for s in da if s in db and ok(da[s]) and ok(db[s])))
    if not seeds:
        raise ValueError("`a` and `b` have no seed in common with finite values.")
    d = np.array([float(da[s]) - float(db[s]) for s in seeds])
    n = d.size
    mean = float(d.mean())
    if n < 2:
        nan = float("nan")
        return Paired(n, mean, nan, nan, (nan, nan), level, nan, nan, seeds)
    sd = float(d.std(ddof=1))
    return _t_result(n, mean, sd, sd / math.sqrt(n), n - 1, level, seeds, 1)


def _t_result(n: int, est: float, sd: float, se: float, df: int, level: float,
              seeds: tuple[int, ...], ddof: int) -> Paired:
    """A [`Paired`][] for estimate `est` with standard error `se` on `df` degrees of
    freedom: the t-interval at `level` and the two-sided p-value."""
    half = t_quantile(0.5 + level / 2, df) * se
    if se == 0.0:
        t, p = (0.0, 1.0) if est == 0.0 else (math.copysign(math.inf, est), 0.0)
    else:
        t = est / se
        p = float(2.0 * _st.t.sf(abs(t), df))
    return Paired(n, est, sd, se, (est - half, est + half), level, t, p, seeds, ddof)


def paired_at_equal_loss(
    d_acc: dict[int, float], d_loss: dict[int, float], *, level: float = 0.95
) -> Paired:
    """The paired accuracy difference `a - b` at equal validation loss, by regression.

    Per seed `s`, `d_acc[s]` is run a's accuracy minus run b's and `d_loss[s]` their
    validation-loss difference. Fitting `d_acc = c + slope * d_loss` by least squares (a
    paired analysis of covariance: seed as a fixed effect, one accuracy-loss slope shared by
    the methods) gives `c`, the accuracy difference the two methods would have at the same
    loss. Use it when the runs' loss ranges do not overlap, so no common loss can be read
    off each run's own curve.

    **Returns:** a [`Paired`][] whose `mean` is `c`, `se` its standard error, `ci` and `p`
    from the t-distribution with `n - 2` degrees of freedom, and `sd` the residual SD
    (`ddof=2`). With fewer than 3 seeds, or no spread in `d_loss`, the SD, interval and
    p-value are `nan`.

    !!! Example

        >>> r = paired_at_equal_loss({0: 0.1, 1: 0.0, 2: 0.21, 3: 0.09},
        ...                          {0: 0.0, 1: 0.1, 2: -0.1, 3: 0.0})
        >>> round(r.mean, 3), r.n, r.ddof
        (0.1, 4, 2)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must lie in (0, 1), got {level}.")
    seeds = tuple(sorted(s for s in d_acc if s in d_loss
                         and math.isfinite(float(d_acc[s])) and math.isfinite(float(d_loss[s]))))
    if not seeds:
        raise ValueError("`d_acc` and `d_loss` have no seed in common with finite values.")
    y = np.array([float(d_acc[s]) for s in seeds])
    x = np.array([float(d_loss[s]) for s in seeds])
    n = len(seeds)
    nan = float("nan")
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if n < 3 or float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return Paired(n, nan, nan, nan, (nan, nan), level, nan, nan, seeds, 2)
    slope = float(xc @ (y - y.mean())) / sxx
    c = float(y.mean() - slope * x.mean())
    resid = y - (c + slope * x)
    sd = float(math.sqrt(resid @ resid / (n - 2)))
    se = sd * math.sqrt(1.0 / n + x.mean() ** 2 / sxx)
    return _t_result(n, c, sd, se, n - 2, level, seeds, 2)


def verdict(result: Paired, *, claim: str) -> str:
    """*supported*, *contradicted* or *not established* for a claim about `a - b`.

    **Arguments:**

    - `result`: a [`Paired`][] comparison of `a - b`.
    - `claim`: `"a > b"` (the difference is positive), `"a < b"`, `"a-b < X"`
      (non-inferiority: `a` exceeds `b` by less than the margin `X`), or `"|a-b| < X"`
      (equivalence: the whole interval inside `(-X, X)`).

    **Returns:** *supported* when the interval lies on the claimed side of zero (inside the
    margin for an equivalence claim), *contradicted* when it lies on the other side
    (entirely outside the margin), otherwise *not established*.

    !!! Example

        >>> verdict(paired([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]), claim="a > b")
        'supported'
        >>> verdict(paired([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]), claim="a < b")
        'contradicted'
    """
    lo, hi = result.ci
    if math.isnan(lo) or math.isnan(hi):
        return "not established"
    if claim == "a > b":
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "not established"
    if claim == "a < b":
        return "supported" if hi < 0 else "contradicted" if lo > 0 else "not established"
    if claim.startswith("a-b < "):  # non-inferiority: a exceeds b by less than the margin
        margin = float(claim.removeprefix("a-b < "))
        return "supported" if hi < margin else "contradicted" if lo >= margin else (
            "not established")
    if claim.startswith("|a-b| < "):
        margin = float(claim.removeprefix("|a-b| < "))
        if -margin < lo and hi < margin:
            return "supported"
        if lo >= margin or hi <= -margin:
            return "contradicted"
        return "not established"
    raise ValueError(
        f'`claim` must be "a > b", "a < b", "a-b < X" or "|a-b| < X", got {claim!r}.')


def accuracy_at_loss(
    val_loss: Sequence[float], accuracy: Sequence[float], target: float
) -> float:
    """One run's accuracy at validation loss `target`, from a straight-line fit.

    Fits `accuracy ≈ c0 + c1 · val_loss` by least squares on the run's evaluation points
    and returns the fit at `target`; `nan` when `target` lies outside the range of the
    run's losses (no extrapolation) or there are fewer than two distinct losses.

    !!! Example

        >>> accuracy_at_loss([2.0, 1.8, 1.6], [0.2, 0.3, 0.4], 1.7)
        0.35
    """
    x = np.asarray(val_loss, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("`val_loss` and `accuracy` must be 1-D and of the same length.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2 or not x.min() <= target <= x.max():
        return float("nan")
    c1, c0 = np.polyfit(x, y, 1)
    return round(float(c0 + c1 * target), 12)


def detectable_difference(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired difference a two-sided t-test detects with `power`.

    `(t_{1-α/2, n-1} + t_{power, n-1}) · sd / sqrt(n)`, with `sd` the SD of the paired
    differences: how many seeds a comparison needs.

    !!! Example

        >>> round(detectable_difference(1.0, 16), 3)
        0.749
    """
    if n < 2:
        raise ValueError(f"`n` must be >= 2, got {n}.")
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
