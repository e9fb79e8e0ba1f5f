"""Exponential and Weibull MLEs recover known parameters; bad input is named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spotpipe.errors import SpotpipeError
from spotpipe.reliability.fits import (
    fit_exponential,
    fit_intervals,
    fit_weibull,
    intervals_from_times,
)


@pytest.mark.parametrize("shape, scale", [(0.7, 5.0), (1.0, 300.0), (2.5, 0.01), (0.4, 1e5)])
def test_weibull_mle_recovers_shape_and_scale(shape, scale):
    rng = np.random.default_rng(42)
    x = scale * rng.weibull(shape, size=20000)
    fit = fit_weibull(x)
    assert fit.shape == pytest.approx(shape, rel=0.03)
    assert fit.scale == pytest.approx(scale, rel=0.04)
    assert fit.mean == pytest.approx(scale * math.gamma(1 + 1 / shape), rel=0.05)
    assert fit.ks < 0.015  # the right model fits the data
    expo = fit_exponential(x)
    assert fit.loglik >= expo.loglik - 1e-6  # Weibull nests the exponential


def test_weibull_mle_satisfies_its_score_equations():
    rng = np.random.default_rng(1)
    x = 3.0 * rng.weibull(0.8, size=500)
    fit = fit_weibull(x)
    k, lam = fit.shape, fit.scale
    # d loglik / d k = 0 and d loglik / d scale = 0 at the MLE
    z = (x / lam) ** k
    assert abs(x.size / k + np.sum(np.log(x / lam)) - np.sum(z * np.log(x / lam))) < 1e-6 * x.size
    assert abs(-x.size * k / lam + k / lam * np.sum(z)) < 1e-6 * x.size * k / lam


def test_exponential_mle_and_ks():
    rng = np.random.default_rng(3)
    x = rng.exponential(7.0, size=10000)
    fit = fit_exponential(x)
    assert fit.rate == pytest.approx(1 / x.mean())
    assert fit.mean == pytest.approx(7.0, rel=0.03)
    assert fit.ks < 0.02
    bursty = 7.0 * rng.weibull(0.5, size=10000)
    assert fit_exponential(bursty).ks > 0.1  # the wrong model is visibly wrong


def test_intervals_drop_simultaneous_events_and_fit_requires_enough():
    gaps, dropped = intervals_from_times([5.0, 1.0, 1.0, 3.0, 3.0, 3.0, 10.0])
    assert gaps.tolist() == [2.0, 2.0, 5.0]
    assert dropped == 3
    assert fit_intervals([0.0, 1.0, 3.0], min_intervals=50) is None
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(2.0, size=200))
    fits = fit_intervals(times, min_intervals=50)
    assert fits is not None and fits.n_intervals == 199 and fits.n_zero_dropped == 0
    assert fits.weibull.shape == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(
    "values, message",
    [([1.0], "at least 2"), ([2.0, 2.0, 2.0], "unbounded"), ([1.0, 0.0, 3.0], "> 0"), ([1.0, float("nan")], "NaN")],
)
def test_weibull_bad_input(values, message):
    with pytest.raises(SpotpipeError, match=message):
        fit_weibull(values)
