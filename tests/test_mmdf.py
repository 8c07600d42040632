"""Known-answer tests for the torch-free MMDF core (SPEC section 4): masked margin, statistic,
null fitting, p-values, thresholds and the flag/correct decision."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from guard.mmdf import (
    DecisionRule,
    Null,
    decide,
    fit_null,
    masked_margin,
    p_values,
    statistic,
    threshold,
)

# ---------------------------------------------------------------------------------------------
# masked_margin: m_k = g_k - max_{i != k} g_i


def test_masked_margin_basic_every_class() -> None:
    g = np.array([[1.0, 3.0, 2.0]] * 3)
    # k=0: 1 - max(3, 2) = -2;  k=1: 3 - max(1, 2) = 1;  k=2: 2 - max(1, 3) = -1
    out = masked_margin(g, np.array([0, 1, 2]))
    np.testing.assert_array_equal(out, [-2.0, 1.0, -1.0])
    assert out.dtype == np.float64


def test_masked_margin_ties() -> None:
    g = np.array([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    # row0 k=0: 2 - max(2, 1) = 0;  row1 k=2: 1 - max(2, 2) = -1;  row2 k=1: 5 - 5 = 0
    out = masked_margin(g, np.array([0, 2, 1]))
    np.testing.assert_array_equal(out, [0.0, -1.0, 0.0])


def test_masked_margin_negative_logits() -> None:
    g = np.array([[-3.0, -1.0, -2.0], [-3.0, -1.0, -2.0]])
    # k=1: -1 - max(-3, -2) = 1;  k=0: -3 - max(-1, -2) = -2
    out = masked_margin(g, np.array([1, 0]))
    np.testing.assert_array_equal(out, [1.0, -2.0])


def test_masked_margin_two_classes() -> None:
    g = np.array([[0.5, -1.5], [0.5, -1.5]])
    # K=2: m_0 = 0.5 - (-1.5) = 2;  m_1 = -1.5 - 0.5 = -2
    np.testing.assert_array_equal(masked_margin(g, np.array([0, 1])), [2.0, -2.0])


def test_masked_margin_large_negative_logits_defeat_zero_masking() -> None:
    # A "multiply the own class by 0" mask would put a 0 into the max and give -5000 - 0 = -5000.
    g = np.array([[-5000.0, -5003.0, -5001.0], [-5000.0, -5003.0, -5001.0]])
    # k=0: -5000 - max(-5003, -5001) = 1;  k=1: -5003 - max(-5000, -5001) = -3
    np.testing.assert_array_equal(masked_margin(g, np.array([0, 1])), [1.0, -3.0])


def test_masked_margin_wide_spread_defeats_subtract_1000() -> None:
    # "g - 1000 * onehot(k)" would leave 5000 - 1000 = 4000 > 3990 in the max and return 1000.
    g = np.array([[5000.0, -5000.0, 3990.0]])
    # k=0: 5000 - max(-5000, 3990) = 1010
    np.testing.assert_array_equal(masked_margin(g, np.array([0])), [1010.0])


def test_masked_margin_does_not_modify_input() -> None:
    g = np.array([[1.0, 3.0, 2.0]])
    masked_margin(g, np.array([1]))
    np.testing.assert_array_equal(g, [[1.0, 3.0, 2.0]])


@pytest.mark.parametrize(
    ("logits", "k"),
    [
        (np.zeros(3), np.array([0])),  # 1-D
        (np.zeros((2, 1)), np.array([0, 0])),  # K = 1
        (np.zeros((2, 3)), np.array([0])),  # wrong number of class indices
        (np.zeros((2, 3)), np.array([[0], [1]])),  # indices not 1-D
    ],
)
def test_masked_margin_bad_shapes(logits: np.ndarray, k: np.ndarray) -> None:
    with pytest.raises(ValueError):
        masked_margin(logits, k)


# ---------------------------------------------------------------------------------------------
# statistic: d = m_c(x) - m_c(x; Z), c = argmax g


def test_statistic_known_answers() -> None:
    g = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 2.0, 0.0]])
    gz = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 0.0]])
    # row0: c=0, m(g)=3-1=2, m(gz)=1-0.5=0.5 -> d=1.5
    # row1: c=1, m(g)=2-1=1, m(gz)=0-max(0,1)=-1 -> d=2
    # row2: tie, argmax takes c=0, m(g)=2-2=0, m(gz)=1-3=-2 -> d=2
    out = statistic(g, gz)
    np.testing.assert_allclose(out, [1.5, 2.0, 2.0], rtol=0, atol=1e-12)
    assert out.dtype == np.float64


def test_statistic_uses_original_decision_not_bounded_one() -> None:
    # c = 0 from the original; the bounded net prefers class 1. d = (4-1) - (1-2) = 3 - (-1) = 4.
    # (Using the bounded decision c'=1 would give (1-4) - (2-1) = -4.)
    out = statistic(np.array([[4.0, 1.0]]), np.array([[1.0, 2.0]]))
    np.testing.assert_array_equal(out, [4.0])


def test_statistic_equal_networks_is_zero() -> None:
    g = np.array([[0.3, -2.0, 7.5], [1.0, 1.5, -1.0]])
    np.testing.assert_array_equal(statistic(g, g.copy()), [0.0, 0.0])


def test_statistic_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        statistic(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------------
# fit_null


def test_fit_null_gaussian_mean_and_unbiased_std() -> None:
    # mean = (1+2+3+4+6)/5 = 3.2; squared deviations 4.84+1.44+0.04+0.64+7.84 = 14.8;
    # unbiased variance 14.8/4 = 3.7 -> sigma = sqrt(3.7) = 1.9235384061671346
    # (the biased one would be sqrt(14.8/5) = 1.7204650534085253)
    null = fit_null(np.array([6.0, 1.0, 4.0, 2.0, 3.0]))
    assert null.kind == "gaussian"
    assert null.mu == pytest.approx(3.2, abs=1e-12)
    assert null.sigma == pytest.approx(1.9235384061671346, abs=1e-12)
    assert null.samples == ()


def test_fit_null_empirical_keeps_sorted_samples() -> None:
    null = fit_null(np.array([6.0, 1.0, 4.0, 2.0, 3.0]), kind="empirical")
    assert null.kind == "empirical"
    assert null.samples == (1.0, 2.0, 3.0, 4.0, 6.0)
    assert null.mu == pytest.approx(3.2, abs=1e-12)
    assert null.sigma == pytest.approx(math.sqrt(3.7), abs=1e-12)


def test_fit_null_empirical_allows_all_equal() -> None:
    null = fit_null(np.array([2.0, 2.0, 2.0]), kind="empirical")
    assert null.sigma == 0.0
    # p(2) = (1 + 3) / 4 = 1;  p(2.5) = (1 + 0) / 4 = 0.25
    np.testing.assert_allclose(p_values(null, np.array([2.0, 2.5])), [1.0, 0.25])


@pytest.mark.parametrize(
    "stats",
    [
        np.array([1.0]),  # fewer than 2
        np.array([]),
        np.array([1.0, np.nan, 2.0]),
        np.array([1.0, np.inf]),
        np.array([3.0, 3.0, 3.0]),  # zero width Gaussian
    ],
)
def test_fit_null_rejects(stats: np.ndarray) -> None:
    with pytest.raises(ValueError):
        fit_null(stats)


# ---------------------------------------------------------------------------------------------
# p-values


def test_gaussian_p_values_known_answers() -> None:
    null = Null("gaussian", mu=2.0, sigma=0.5)
    z = np.array([1.6448536, 0.0, 2.5758293, -1.6448536, 1.0])
    p = p_values(null, 2.0 + 0.5 * z)
    # 1 - Phi(1.6448536) = 0.05; 1 - Phi(0) = 0.5; 1 - Phi(2.5758293) = 0.005;
    # 1 - Phi(-1.6448536) = 0.95; 1 - Phi(1) = 0.15865525393145707 (standard normal tables)
    np.testing.assert_allclose(p, [0.05, 0.5, 0.005, 0.95, 0.15865525393145707], rtol=1e-6)


def test_gaussian_p_value_keeps_precision_in_far_tail() -> None:
    # 1 - Phi(10) = 7.6198530241605e-24; "1 - ndtr(10)" would round to exactly 0.
    p = p_values(Null("gaussian", mu=0.0, sigma=1.0), np.array([10.0]))
    assert p[0] == pytest.approx(7.6198530241605e-24, rel=1e-9)


def test_empirical_p_values_by_hand_with_ties() -> None:
    null = Null("empirical", mu=0.0, sigma=1.0, samples=(1.0, 2.0, 2.0, 3.0, 5.0))  # n = 5
    d = np.array([0.0, 1.0, 2.0, 2.5, 5.0, 5.1])
    # (1 + #{d_i >= d}) / 6:  d=0 -> 6/6; d=1 -> 6/6; d=2 -> (1+4)/6 (both tied 2s count);
    # d=2.5 -> (1+2)/6; d=5 -> (1+1)/6 (the tie at 5 counts); d=5.1 -> 1/6
    np.testing.assert_allclose(
        p_values(null, d), [1.0, 1.0, 5 / 6, 3 / 6, 2 / 6, 1 / 6], rtol=0, atol=1e-15
    )


def test_empirical_p_values_do_not_depend_on_sample_order() -> None:
    null = Null.from_dict({"kind": "empirical", "mu": 0.0, "sigma": 1.0, "samples": [5, 1, 3]})
    # n=3: d=2 -> (1 + #{5, 3}) / 4 = 3/4;  d=4 -> (1 + #{5}) / 4 = 1/2
    np.testing.assert_allclose(p_values(null, np.array([2.0, 4.0])), [0.75, 0.5])


# ---------------------------------------------------------------------------------------------
# threshold


@pytest.mark.parametrize(("alpha", "z"), [(0.05, 1.6448536269514722), (0.005, 2.5758293035489004)])
def test_threshold_gaussian_known_and_consistent(alpha: float, z: float) -> None:
    null = Null("gaussian", mu=2.0, sigma=0.5)
    t = threshold(null, alpha)
    # mu + sigma * z_{1-alpha}: 2 + 0.5 * 1.6448536 = 2.8224268; 2 + 0.5 * 2.5758293 = 3.2879147
    assert t == pytest.approx(2.0 + 0.5 * z, abs=1e-9)
    above, below = p_values(null, np.array([t + 1e-6, t - 1e-6]))
    assert above < alpha < below


def test_threshold_empirical_by_hand() -> None:
    null = Null("empirical", mu=0.0, sigma=1.0, samples=tuple(float(v) for v in range(1, 100)))
    # n = 99, alpha = 0.05: p < 0.05 <=> (1 + #ge) / 100 < 0.05 <=> #ge <= 3 <=> d > 96
    t = threshold(null, 0.05)
    assert t == np.nextafter(96.0, np.inf)
    # just above: #{97,98,99} = 3 -> p = 4/100 < 0.05; exactly at 96: p = 5/100, not < 0.05
    assert p_values(null, np.array([t]))[0] == pytest.approx(0.04)
    assert p_values(null, np.array([96.0]))[0] == pytest.approx(0.05)
    assert not p_values(null, np.array([96.0]))[0] < 0.05


def test_threshold_empirical_non_integer_boundary() -> None:
    null = Null("empirical", mu=0.0, sigma=1.0, samples=tuple(float(v) for v in range(1, 11)))
    # n = 10, alpha = 0.2: (1 + #ge) / 11 < 0.2 <=> #ge < 1.2 <=> #ge <= 1 <=> d > 9
    t = threshold(null, 0.2)
    assert t == np.nextafter(9.0, np.inf)
    assert p_values(null, np.array([t]))[0] == pytest.approx(2 / 11)  # 0.18 < 0.2
    assert p_values(null, np.array([9.0]))[0] == pytest.approx(3 / 11)  # 0.27 >= 0.2


def test_threshold_empirical_unreachable_is_inf() -> None:
    null = Null("empirical", mu=0.0, sigma=1.0, samples=tuple(float(v) for v in range(1, 11)))
    # n = 10: the smallest possible p is 1/11 = 0.0909 > 0.05, so nothing is ever flagged
    assert threshold(null, 0.05) == math.inf
    assert not np.any(p_values(null, np.array([1e9])) < 0.05)


def test_threshold_empirical_alpha_times_n_plus_one_integer() -> None:
    null = Null("empirical", mu=0.0, sigma=1.0, samples=tuple(float(v) for v in range(1, 25)))
    # n = 24, alpha = 0.28 = 7/25: (1 + #ge) / 25 < 7/25 <=> #ge <= 5 <=> d > 19
    t = threshold(null, 0.28)
    assert p_values(null, np.array([t]))[0] < 0.28
    assert t == np.nextafter(19.0, np.inf)


# ---------------------------------------------------------------------------------------------
# decide


def _decide_case() -> tuple[np.ndarray, np.ndarray]:
    g = np.array(
        [
            [3.0, 1.0, 0.0],  # row0: c=0, m=2
            [10.0, 0.0, 1.0],  # row1: c=0, m=9
            [0.0, 8.0, 0.0],  # row2: c=1, m=8
            [1.0, 1.5, 0.0],  # row3: c=1, m=0.5
        ]
    )
    gz = np.array(
        [
            [2.9, 1.0, 0.0],  # m_0 = 1.9 -> d = 0.1, p = 1 - Phi(0.1) = 0.46: not flagged
            [2.0, 1.5, 0.0],  # m_0 = 0.5 -> d = 8.5, p ~ 1e-17: flagged; bounded argmax is
            #                   still c = 0, so the correction must take the runner-up, class 1
            [0.0, 1.0, 3.0],  # m_1 = 1 - 3 = -2 -> d = 10: flagged; argmax_{k != 1} = 2
            [1.2, 1.0, 0.0],  # m_1 = 1 - 1.2 = -0.2 -> d = 0.7, p = 0.242: flagged only by
            #                   disagreement (bounded decision 0 != 1); argmax_{k != 1} = 0
        ]
    )
    return g, gz


def test_decide_without_disagreement_rule() -> None:
    g, gz = _decide_case()
    null = Null("gaussian", mu=0.0, sigma=1.0)
    out = decide(g, gz, null, DecisionRule(alpha=0.005, flag_on_disagreement=False))
    np.testing.assert_allclose(out.statistic, [0.1, 8.5, 10.0, 0.7], atol=1e-6)
    # 1 - Phi(0.1) = 0.4601721627; 1 - Phi(0.7) = 0.2419636522
    assert out.p_value[0] == pytest.approx(0.4601721627, rel=1e-5)
    assert out.p_value[3] == pytest.approx(0.2419636522, rel=1e-5)
    assert out.p_value[1] < 1e-15 and out.p_value[2] < 1e-15
    np.testing.assert_array_equal(out.flagged, [False, True, True, False])
    np.testing.assert_array_equal(out.original_label, [0, 0, 1, 1])
    np.testing.assert_array_equal(out.bounded_label, [0, 0, 2, 0])
    np.testing.assert_array_equal(out.label, [0, 1, 2, 1])
    assert out.label.dtype == np.int64
    # unflagged rows keep the original logits, flagged rows carry the bounded ones
    expected_logits = np.stack([g[0], gz[1], gz[2], g[3]]).astype(np.float32)
    np.testing.assert_array_equal(out.logits, expected_logits)
    assert out.logits.dtype == np.float32


def test_decide_with_disagreement_rule() -> None:
    g, gz = _decide_case()
    null = Null("gaussian", mu=0.0, sigma=1.0)
    out = decide(g, gz, null, DecisionRule(alpha=0.005, flag_on_disagreement=True))
    np.testing.assert_array_equal(out.flagged, [False, True, True, True])
    np.testing.assert_array_equal(out.label, [0, 1, 2, 0])
    np.testing.assert_array_equal(out.logits[3], gz[3].astype(np.float32))
    np.testing.assert_array_equal(out.logits[0], g[0].astype(np.float32))


def test_decide_alpha_controls_flagging() -> None:
    g, gz = _decide_case()
    null = Null("gaussian", mu=0.0, sigma=1.0)
    # alpha = 0.3 > p(row3) = 0.242 but < p(row0) = 0.46
    out = decide(g, gz, null, DecisionRule(alpha=0.3))
    np.testing.assert_array_equal(out.flagged, [False, True, True, True])
    np.testing.assert_array_equal(out.label, [0, 1, 2, 0])


def test_decide_with_empirical_null() -> None:
    g, gz = _decide_case()
    # d = [0.1, 8.5, 10, 0.7]; samples n=9 -> p = (1 + #ge) / 10
    null = Null("empirical", 0.0, 1.0, samples=tuple(float(v) for v in range(1, 10)))
    out = decide(g, gz, null, DecisionRule(alpha=0.15))
    # d=0.1 -> 10/10; d=8.5 -> (1+1)/10; d=10 -> 1/10; d=0.7 -> 10/10
    np.testing.assert_allclose(out.p_value, [1.0, 0.2, 0.1, 1.0])
    np.testing.assert_array_equal(out.flagged, [False, False, True, False])
    np.testing.assert_array_equal(out.label, [0, 0, 2, 1])


# ---------------------------------------------------------------------------------------------
# Null / DecisionRule validation and serialisation


def test_null_round_trip_gaussian() -> None:
    null = Null("gaussian", mu=1.25, sigma=0.75)
    d = null.to_dict()
    assert d == {"kind": "gaussian", "mu": 1.25, "sigma": 0.75, "n": 0}
    assert Null.from_dict(d) == null


def test_null_round_trip_empirical() -> None:
    null = fit_null(np.array([3.0, 1.0, 2.0, 2.0]), kind="empirical")
    d = null.to_dict()
    assert d["kind"] == "empirical" and d["n"] == 4 and d["samples"] == [1.0, 2.0, 2.0, 3.0]
    back = Null.from_dict(d)
    assert back == null
    x = np.array([0.0, 2.0, 2.5, 9.0])
    np.testing.assert_array_equal(p_values(back, x), p_values(null, x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "laplace", "mu": 0.0, "sigma": 1.0},
        {"kind": "gaussian", "mu": 0.0, "sigma": 0.0},
        {"kind": "gaussian", "mu": 0.0, "sigma": -1.0},
        {"kind": "gaussian", "mu": float("nan"), "sigma": 1.0},
        {"kind": "gaussian", "mu": 0.0, "sigma": float("inf")},
        {"kind": "empirical", "mu": 0.0, "sigma": 1.0},  # no samples
    ],
)
def test_null_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Null(**kwargs)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_decision_rule_rejects_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        DecisionRule(alpha=alpha)


def test_decision_rule_defaults() -> None:
    rule = DecisionRule()
    assert rule.alpha == 0.005 and rule.flag_on_disagreement is False


# ---------------------------------------------------------------------------------------------
# the serving side must not import torch


def test_guard_imports_do_not_pull_torch() -> None:
    code = (
        "import sys\n"
        "import guard.mmdf, guard.artifact, guard.engine, guard.cli\n"
        "guard.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
