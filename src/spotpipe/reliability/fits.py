"""Maximum-likelihood fits of time between failures: exponential and Weibull (numpy only).

Schroeder and Gibson ("A large-scale study of failures in high-performance computing systems",
DSN 2006) found the time between failures of HPC systems better described by a Weibull
distribution with decreasing hazard (shape < 1) than by an exponential; Kokolis et al. (Meta,
2025) fit the same families to ML-cluster failures. Both fits here are exact MLEs:

* exponential: ``rate = n / sum(x)``;
* Weibull ``F(x) = 1 - exp(-(x/scale)^shape)``: the shape ``k`` solves
  ``sum(x^k ln x) / sum(x^k) - 1/k - mean(ln x) = 0`` (monotone in ``k``; Newton's method with
  a bisection bracket), then ``scale = mean(x^k)^(1/k)``.

Goodness of fit is reported as the Kolmogorov-Smirnov distance and the AIC of each family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from spotpipe.errors import SpotpipeError

MIN_INTERVALS = 50  # fewer positive intervals than this: too few records for a per-system fit


@dataclass(frozen=True)
class ExponentialFit:
    """Exponential MLE: ``rate`` per unit of the data, ``mean = 1 / rate``."""

    rate: float
    mean: float
    loglik: float
    ks: float
    n: int

    def cdf(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """``1 - exp(-rate x)``.

        Args:
            x: Intervals, in the unit of the fit (seconds for traces); negatives count as 0.

        Returns:
            The CDF at each ``x``, same shape.
        """
        return -np.expm1(-self.rate * np.clip(x, 0.0, None))


@dataclass(frozen=True)
class WeibullFit:
    """Weibull MLE: ``shape`` (k < 1: decreasing hazard) and ``scale`` in units of the data."""

    shape: float
    scale: float
    mean: float
    loglik: float
    ks: float
    n: int
    iterations: int

    def cdf(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """``1 - exp(-(x/scale)^shape)``.

        Args:
            x: Intervals, in the unit of the fit (seconds for traces); negatives count as 0.

        Returns:
            The CDF at each ``x``, same shape.
        """
        return -np.expm1(-np.power(np.clip(x, 0.0, None) / self.scale, self.shape))


@dataclass(frozen=True)
class IntervalFits:
    """Fits of one set of intervals, with how the raw data were cleaned."""

    n_intervals: int
    n_zero_dropped: int
    exponential: ExponentialFit
    weibull: WeibullFit

    @property
    def preferred(self) -> str:
        """The family with the lower AIC (Weibull has one more parameter)."""
        aic_exp = 2 * 1 - 2 * self.exponential.loglik
        aic_wei = 2 * 2 - 2 * self.weibull.loglik
        return "weibull" if aic_wei < aic_exp else "exponential"


def _clean(values: ArrayLike) -> NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size and not np.all(np.isfinite(x)):
        raise SpotpipeError("intervals contain NaN or infinite values")
    if np.any(x <= 0):
        raise SpotpipeError("intervals must be > 0 (drop simultaneous failures first)")
    if x.size < 2:
        raise SpotpipeError(f"need at least 2 positive intervals to fit, got {x.size}")
    return x


def ks_distance(sorted_x: NDArray[np.float64], cdf_values: NDArray[np.float64]) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``sorted_x`` and a model CDF.

    Args:
        sorted_x: Samples, ascending, shape ``(n,)``.
        cdf_values: The model CDF at each of ``sorted_x``, shape ``(n,)``.

    Returns:
        The largest gap between the two CDFs, in [0, 1].
    """
    n = sorted_x.size
    upper = np.arange(1, n + 1, dtype=np.float64) / n
    lower = np.arange(0, n, dtype=np.float64) / n
    return float(max(np.max(upper - cdf_values), np.max(cdf_values - lower)))


def fit_exponential(values: ArrayLike) -> ExponentialFit:
    """Exponential MLE of positive intervals.

    Args:
        values: Intervals, any shape (flattened), all > 0 and finite.

    Returns:
        Rate (1 / unit), mean, log-likelihood, KS distance and count.

    Raises:
        SpotpipeError: for fewer than 2 intervals, or one that is <= 0 or not finite.
    """
    x = _clean(values)
    mean = float(x.mean())
    rate = 1.0 / mean
    loglik = float(x.size * math.log(rate) - rate * x.sum())
    xs = np.sort(x)
    ks = ks_distance(xs, -np.expm1(-rate * xs))
    return ExponentialFit(rate=rate, mean=mean, loglik=loglik, ks=ks, n=int(x.size))


def _shape_equation(k: float, z: NDArray[np.float64], mean_z: float) -> tuple[float, float]:
    """g(k) and g'(k) for log-data ``z`` (already centred so that max(z) = 0: no overflow)."""
    w = np.exp(k * z)
    s0 = float(w.sum())
    s1 = float((w * z).sum())
    s2 = float((w * z * z).sum())
    g = s1 / s0 - 1.0 / k - mean_z
    dg = (s2 * s0 - s1 * s1) / (s0 * s0) + 1.0 / (k * k)
    return g, dg


def fit_weibull(values: ArrayLike, tol: float = 1e-10, max_iter: int = 200) -> WeibullFit:
    """Weibull MLE of positive intervals (safeguarded Newton on the shape equation).

    Args:
        values: Intervals, any shape (flattened), all > 0 and finite.
        tol: Tolerance of the shape's root.
        max_iter: Most Newton steps.

    Returns:
        Shape, scale (unit of ``values``), mean, log-likelihood, KS distance and count.

    Raises:
        SpotpipeError: fewer than 2 intervals, or all equal (the shape is unbounded).
    """
    x = _clean(values)
    log_x = np.log(x)
    if float(np.ptp(log_x)) < 1e-12:
        raise SpotpipeError("all intervals are equal: the Weibull shape is unbounded")
    shift = float(log_x.max())
    z = log_x - shift  # x / max(x) in log space; the shape equation is scale-invariant
    mean_z = float(z.mean())
    lo, hi = 1e-3, 1.0
    while _shape_equation(hi, z, mean_z)[0] < 0:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise SpotpipeError("Weibull shape did not converge (intervals nearly equal)")
    k = 1.0 if lo < 1.0 else 0.5 * (lo + hi)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        g, dg = _shape_equation(k, z, mean_z)
        if g > 0:
            hi = k
        else:
            lo = k
        step = g / dg
        candidate = k - step
        if not (lo < candidate < hi):
            candidate = 0.5 * (lo + hi)
        if abs(candidate - k) <= tol * max(1.0, k):
            k = candidate
            break
        k = candidate
    scale = math.exp(shift + math.log(float(np.mean(np.exp(k * z)))) / k)
    n = x.size
    loglik = float(
        n * math.log(k) - n * k * math.log(scale) + (k - 1.0) * log_x.sum() - np.sum((x / scale) ** k)
    )
    xs = np.sort(x)
    ks = ks_distance(xs, -np.expm1(-np.power(xs / scale, k)))
    return WeibullFit(
        shape=k,
        scale=scale,
        mean=scale * math.gamma(1.0 + 1.0 / k),
        loglik=loglik,
        ks=ks,
        n=int(n),
        iterations=iterations,
    )


def intervals_from_times(times: ArrayLike) -> tuple[NDArray[np.float64], int]:
    """Positive gaps between sorted event times, and how many zero gaps were dropped.

    Records with the same timestamp (several nodes in one incident, or a clock of one-minute
    resolution) give zero gaps; they are merged into one event rather than fitted.

    Args:
        times: Event times, any shape (flattened), e.g. seconds.

    Returns:
        ``(positive gaps in the unit of times, zero gaps dropped)``.
    """
    t = np.sort(np.asarray(times, dtype=np.float64).ravel())
    gaps = np.diff(t)
    positive = gaps[gaps > 0]
    return positive, int(gaps.size - positive.size)


def fit_intervals(times: ArrayLike, min_intervals: int = MIN_INTERVALS) -> IntervalFits | None:
    """Fit the time between events given their times; ``None`` with too few intervals.

    Args:
        times: Event times (seconds for traces).
        min_intervals: Fewest positive gaps to fit (at least 2 are always needed).

    Returns:
        Both fits and the preferred one (see the module docstring); ``None`` with too few gaps or all
        gaps equal.
    """
    gaps, dropped = intervals_from_times(times)
    if gaps.size < max(2, min_intervals) or float(np.ptp(np.log(gaps))) < 1e-12:
        return None
    return IntervalFits(
        n_intervals=int(gaps.size),
        n_zero_dropped=dropped,
        exponential=fit_exponential(gaps),
        weibull=fit_weibull(gaps),
    )
