"""Known-answer tests for the peaks-over-threshold null (`--null gpd`): the generalized Pareto
survival and its inverse, the fit, p-values, the threshold and the manifest round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from guard.mmdf import (
    GPD_MIN_SHAPE,
    GPD_SHAPE_FLOOR,
    Null,
    fit_gpd_tail,
    fit_null,
    gpd_inverse_survival,
    gpd_min_samples,
    gpd_survival,
    p_values,
    threshold,
)


@pytest.mark.parametrize("xi", [-0.5, -0.2, 0.0, 0.3, 1.0])
def test_survival_matches_scipy_and_inverts(xi: float) -> None:
    y = np.linspace(0.0, 4.0, 33)
    np.testing.assert_allclose(
        gpd_survival(y, xi, 1.5), stats.genpareto.sf(y, xi, scale=1.5), rtol=1e-10, atol=1e-14
    )
    for q in (0.9, 0.2, 0.025, 1e-4):
        assert gpd_survival(np.array([gpd_inverse_survival(q, xi, 1.5)]), xi, 1.5)[0] == (
            pytest.approx(q, rel=1e-9)
        )


def test_survival_known_values() -> None:
    # xi = 0 is the exponential law; xi = 1, beta = 1 gives 1 / (1 + y); xi = -0.5, beta = 1
    # ends at y = 2 with (1 - y/2)^2 before it
    assert gpd_survival(np.array([2.0]), 0.0, 2.0)[0] == pytest.approx(math.exp(-1.0))
    np.testing.assert_allclose(gpd_survival(np.array([0.0, 1.0, 3.0]), 1.0, 1.0), [1, 0.5, 0.25])
    np.testing.assert_allclose(
        gpd_survival(np.array([0.0, 1.0, 2.0, 5.0]), -0.5, 1.0), [1.0, 0.25, 0.0, 0.0]
    )
    assert gpd_inverse_survival(0.25, 1.0, 1.0) == pytest.approx(3.0)
    assert gpd_inverse_survival(math.exp(-1.0), 0.0, 2.0) == pytest.approx(2.0)


def test_fit_threshold_share_and_maximum_likelihood_tail() -> None:
    s = np.arange(1.0, 201.0)  # 1..200: the top fifth is 161..200, the threshold 160
    s = np.random.default_rng(0).permutation(s)
    u, zeta, xi, beta = fit_gpd_tail(s, GPD_MIN_SHAPE)
    assert u == 160.0 and zeta == pytest.approx(0.2)
    # uniform excesses 1..40 have a light tail: the free estimate is below -1/2, so with the
    # floor at -1/2 the shape is held there and the scale is the likelihood's maximiser for
    # that shape (> 40 / 2, the end of the support having to lie past the largest excess)
    assert xi == GPD_MIN_SHAPE
    excess = np.arange(1.0, 41.0)
    best = optimize.minimize_scalar(
        lambda b: -stats.genpareto.logpdf(excess, GPD_MIN_SHAPE, scale=b).sum(),
        bounds=(20.0 + 1e-9, 1000.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert beta == pytest.approx(best.x, rel=1e-3)


def test_a_shape_floor_of_zero_gives_the_exponential_tail_of_the_mean_excess() -> None:
    """Calibration's floor (GPD_SHAPE_FLOOR, the default): the same uniform excesses 1..40,
    whose free estimate is below 0, get the exponential tail, whose maximum-likelihood scale is
    the mean excess (20.5); p-values then have no end: past the largest sample they stay > 0."""
    assert GPD_SHAPE_FLOOR == 0.0
    s = np.random.default_rng(0).permutation(np.arange(1.0, 201.0))
    u, _, xi, beta = fit_gpd_tail(s)
    assert (u, xi) == (160.0, 0.0) and beta == pytest.approx(20.5, rel=1e-3)
    bounded = fit_null(s, "gpd", GPD_MIN_SHAPE)
    floored = fit_null(s, "gpd")
    far = np.array([260.0])  # past the bounded fit's end (160 + beta / 0.5 < 260)
    assert p_values(bounded, far)[0] == 0.0
    assert p_values(floored, far)[0] == pytest.approx(0.2 * math.exp(-100.0 / 20.5), rel=1e-3)
    assert threshold(floored, 0.0025) > threshold(bounded, 0.0025)
    with pytest.raises(ValueError, match="shape's floor"):
        fit_gpd_tail(s, -0.6)


def test_fit_recovers_a_pareto_tail() -> None:
    # exponential samples: excesses over any threshold are exponential again (xi = 0, beta = 2)
    s = np.random.default_rng(1).exponential(2.0, size=20000)
    null = fit_null(s, "gpd")
    assert abs(null.tail_xi) < 0.05 and null.tail_beta == pytest.approx(2.0, rel=0.05)
    # so the fitted p-value of a far value matches the true one, exp(-d / 2)
    assert p_values(null, np.array([16.0]))[0] == pytest.approx(math.exp(-8.0), rel=0.3)


@pytest.mark.parametrize("scale", [1e-6, 1e9])
def test_fit_does_not_depend_on_the_unit(scale: float) -> None:
    s = np.random.default_rng(5).lognormal(0.0, 1.0, size=200)
    base, scaled = fit_null(s, "gpd"), fit_null(s * scale, "gpd")
    assert scaled.tail_xi == pytest.approx(base.tail_xi, rel=1e-3, abs=1e-4)
    assert scaled.tail_beta == pytest.approx(base.tail_beta * scale, rel=1e-3)
    assert threshold(scaled, 0.005) == pytest.approx(threshold(base, 0.005) * scale, rel=1e-3)


def test_p_values_body_conformal_tail_pareto_and_monotone() -> None:
    s = np.random.default_rng(2).gamma(2.0, 1.0, size=200)
    null = fit_null(s, "gpd")
    ref = np.sort(s)
    body = np.array([ref[3], ref[100], null.tail_u])
    np.testing.assert_allclose(
        p_values(null, body), [(1 + np.sum(ref >= v)) / 201 for v in body], rtol=1e-12
    )
    far = null.tail_u + np.array([0.5, 2.0, 10.0])
    expected = null.tail_zeta * stats.genpareto.sf(
        far - null.tail_u, null.tail_xi, scale=null.tail_beta
    )
    np.testing.assert_allclose(p_values(null, far), expected, rtol=1e-10)
    grid = np.linspace(-1.0, ref[-1] + 20.0, 2001)
    assert np.all(np.diff(p_values(null, grid)) <= 0)


def test_threshold_agrees_with_p_values() -> None:
    null = fit_null(np.random.default_rng(3).lognormal(0.0, 1.0, size=200), "gpd")
    for alpha in (0.05, 0.005, 1e-4):
        thr = threshold(null, alpha)
        assert thr > null.tail_u
        assert p_values(null, np.array([thr]))[0] == pytest.approx(alpha, rel=1e-9)
    # at or above the tail's share the body's conformal threshold applies
    assert threshold(null, 0.5) < null.tail_u


def test_round_trip() -> None:
    null = fit_null(np.random.default_rng(4).exponential(1.0, size=100), "gpd")
    d = null.to_dict()
    assert d["kind"] == "gpd" and d["n"] == 100 and len(d["samples"]) == 100
    assert {"tail_u", "tail_zeta", "tail_xi", "tail_beta"} <= d.keys()
    back = Null.from_dict(d)
    assert back == null
    x = np.array([0.0, 1.0, 3.0, 9.0])
    np.testing.assert_array_equal(p_values(back, x), p_values(null, x))


def test_too_few_samples_or_ties_are_refused() -> None:
    assert gpd_min_samples() == 50
    with pytest.raises(ValueError, match="at least 50"):
        fit_null(np.arange(49.0), "gpd")
    ties = np.concatenate([np.zeros(190), np.arange(1.0, 11.0)])
    ties[-1] = 0.0  # nine values above the threshold 0: too few to fit a tail
    with pytest.raises(ValueError, match="above its threshold"):
        fit_null(ties, "gpd")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tail_zeta": 0.0},
        {"tail_zeta": 1.5},
        {"tail_beta": 0.0},
        {"tail_xi": -0.9},
        {"tail_u": float("nan")},
    ],
)
def test_null_rejects_bad_tail(kwargs: dict) -> None:
    good = {"tail_u": 1.0, "tail_zeta": 0.2, "tail_xi": 0.1, "tail_beta": 0.5}
    with pytest.raises(ValueError, match="gpd null"):
        Null(kind="gpd", mu=0.0, sigma=1.0, samples=(1.0, 2.0), **(good | kwargs))


def test_a_stalled_optimiser_falls_back_to_the_exponential_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # scipy's fit returning a scale far too small (as it did on excesses of 1e9 before they
    # were rescaled): the fit must not keep a tail less likely than the exponential one
    monkeypatch.setattr(stats.genpareto, "fit", lambda *a, **k: (0.1, 0.0, 1e-12))
    s = np.arange(1.0, 201.0)
    u, zeta, xi, beta = fit_gpd_tail(s)
    assert (u, zeta, xi) == (160.0, 0.2, 0.0)
    assert beta == pytest.approx(np.arange(1.0, 41.0).mean())  # the mean excess
