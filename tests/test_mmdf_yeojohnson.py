"""Known-answer tests for the Yeo-Johnson null (`--null yeojohnson`): the transform, its inverse,
the fit, p-values, threshold and the manifest round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from guard.mmdf import (
    Null,
    fit_null,
    p_values,
    threshold,
    yeo_johnson,
    yeo_johnson_inverse,
)


def test_transform_known_values() -> None:
    x = np.array([-3.0, -1.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(yeo_johnson(x, 1.0), x)  # lambda 1 is the identity
    # lambda 0: log(1 + x) for x >= 0; lambda 2: -log(1 - x) for x < 0
    np.testing.assert_allclose(yeo_johnson(np.array([1.0, 3.0]), 0.0), np.log([2.0, 4.0]))
    np.testing.assert_allclose(yeo_johnson(np.array([-1.0, -3.0]), 2.0), -np.log([2.0, 4.0]))
    # lambda 0.5 at x = 3: ((4)^0.5 - 1) / 0.5 = 2; at x = -1: -((2)^1.5 - 1) / 1.5
    np.testing.assert_allclose(yeo_johnson(np.array([3.0, -1.0]), 0.5), [2.0, -(2**1.5 - 1) / 1.5])


@pytest.mark.parametrize("lmbda", [-1.0, 0.0, 0.3, 1.0, 1.7, 2.0, 2.5])
def test_transform_matches_scipy_and_inverts(lmbda: float) -> None:
    x = np.linspace(-5, 5, 41)
    t = yeo_johnson(x, lmbda)
    np.testing.assert_allclose(t, stats.yeojohnson(x, lmbda), rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(t) > 0)  # monotone: p-values order inputs exactly as d does
    np.testing.assert_allclose(yeo_johnson_inverse(t, lmbda), x, rtol=1e-9, atol=1e-9)


def test_fit_uses_the_maximum_likelihood_exponent() -> None:
    s = np.random.default_rng(0).gamma(2.0, 1.0, size=300) - 1.0
    null = fit_null(s, "yeojohnson")
    t, lmbda = stats.yeojohnson(s)
    assert null.lmbda == pytest.approx(lmbda, rel=1e-6)
    assert null.mu == pytest.approx(t.mean()) and null.sigma == pytest.approx(t.std(ddof=1))


def test_p_values_and_threshold_agree() -> None:
    null = Null(kind="yeojohnson", mu=0.5, sigma=0.8, lmbda=0.5)
    d = np.array([-2.0, 0.0, 1.0, 5.0, 50.0])
    p = p_values(null, d)
    t = yeo_johnson(d, 0.5)
    np.testing.assert_allclose(p, stats.norm.sf((t - 0.5) / 0.8))
    assert np.all(np.diff(p) < 0)
    thr = threshold(null, 0.005)
    assert p_values(null, np.array([thr]))[0] == pytest.approx(0.005)


def test_threshold_beyond_the_transform_range_is_inf() -> None:
    # lambda < 0 bounds the transform above by -1/lambda = 0.5: no d reaches mu + 2.576 sigma
    null = Null(kind="yeojohnson", mu=0.3, sigma=0.2, lmbda=-2.0)
    assert threshold(null, 0.005) == math.inf


def test_skewed_clean_statistic_gets_a_near_nominal_false_positive_rate() -> None:
    """What the option is for: a right-skewed clean statistic, where the plain Gaussian null
    flags several times alpha of new clean inputs."""
    rng = np.random.default_rng(1)
    fit, fresh = rng.lognormal(0, 0.6, 400), rng.lognormal(0, 0.6, 200_000)
    fpr = {
        k: np.mean(p_values(fit_null(fit, k), fresh) < 0.005) for k in ("gaussian", "yeojohnson")
    }
    assert fpr["gaussian"] > 0.015
    assert fpr["yeojohnson"] < 0.01


def test_round_trip_keeps_the_exponent() -> None:
    null = fit_null(np.random.default_rng(2).normal(size=50) ** 2, "yeojohnson")
    back = Null.from_dict(null.to_dict())
    assert back == null and null.to_dict()["lmbda"] == null.lmbda


def test_rejects_a_non_finite_exponent() -> None:
    with pytest.raises(ValueError, match="lmbda"):
        Null(kind="yeojohnson", mu=0.0, sigma=1.0, lmbda=float("nan"))


def test_negative_exponent_kept_while_the_tail_stays_reachable() -> None:
    s = np.random.default_rng(1).lognormal(0, 0.6, size=400)
    lmbda = stats.yeojohnson_normmax(s)
    assert lmbda < 0 and fit_null(s, "yeojohnson").lmbda == pytest.approx(lmbda, rel=1e-6)


def test_exponent_falls_back_to_a_log_when_the_tail_would_be_unreachable() -> None:
    """Below 0 the transform is bounded above by -1/lambda: when that bound leaves no room for
    a p-value of 1e-4 the fit uses 0 (a log), so the 0.005 threshold stays finite."""
    from guard.mmdf import MIN_REACHABLE_ALPHA, yeo_johnson

    s = np.random.default_rng(3).lognormal(0, 2.0, size=300)
    mle = stats.yeojohnson_normmax(s)
    t = yeo_johnson(s, mle)
    floor = stats.norm.sf((-1 / mle - t.mean()) / t.std(ddof=1))
    assert mle < 0 and floor > MIN_REACHABLE_ALPHA  # the MLE alone could hardly ever flag
    null = fit_null(s, "yeojohnson")
    assert null.lmbda == 0.0
    thr = threshold(null, 0.005)
    assert math.isfinite(thr) and p_values(null, np.array([thr * 1.01]))[0] < 0.005
