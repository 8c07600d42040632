"""MMDF: the test-time statistic, its null, p-values and the flag/correct decision (SPEC section 4).

Torch-free on purpose: calibration fits the null with these functions and the server scores every
request with the same ones, so the statistic has exactly one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import ndtr

NullKind = Literal["gaussian", "yeojohnson", "empirical", "gpd"]
NULL_KINDS: tuple[str, ...] = ("gaussian", "yeojohnson", "empirical", "gpd")

GPD_TAIL_FRACTION = 0.2
"""A `gpd` null models the top fifth of the held-out clean statistics as a generalized Pareto
tail (peaks over the threshold at their 80th percentile)."""
GPD_MIN_EXCEEDANCES = 10
"""A `gpd` null needs at least this many statistics above its threshold (so 50 held-out images)."""
GPD_MIN_SHAPE = -0.5
"""The lowest tail shape a `gpd` null may hold or be fitted with: maximum likelihood is regular
only above -1/2 (Smith 1985), and a more negative shape puts the tail's end at the largest
sample, as if the sample were the law."""

GPD_SHAPE_FLOOR = 0.0
"""Where calibration holds a fitted tail shape: at 0 or above (exponential or heavier). Every
statistic the guard tests has no finite upper end (the learned or start bounds' shrinkage of a
margin that the original network leaves unbounded, or a maximum over many channels of unbounded
ReLU activations), while a negative shape fitted to some forty exceedances puts one just past the
largest held-out value. On the CIFAR-10 benchmark the range detector's fit hit -1/2 on the
width-16 chessboard model and flagged 1.57% of clean inputs at alpha 0.005, 0.40% with the floor;
the learned statistic's hit it on BadNets and on WaNet on a VGG-11 (0.99% and 1.69% of clean
inputs flagged by the guard; 0.43% and 0.38% with the floor; docs/RESULTS.md)."""


def yeo_johnson(x: np.ndarray, lmbda: float) -> np.ndarray:
    """The Yeo-Johnson power transform (monotone increasing, defined for every real x):

    x >= 0: ((x + 1)^l - 1) / l  (log1p(x) when l = 0);
    x < 0:  -((1 - x)^(2 - l) - 1) / (2 - l)  (-log1p(-x) when l = 2).
    """
    x = np.asarray(x, dtype=np.float64)
    pos = x >= 0
    out = np.empty_like(x)
    xp, xn = x[pos], x[~pos]
    if abs(lmbda) < 1e-12:
        out[pos] = np.log1p(xp)
    else:
        out[pos] = np.expm1(lmbda * np.log1p(xp)) / lmbda
    if abs(lmbda - 2.0) < 1e-12:
        out[~pos] = -np.log1p(-xn)
    else:
        out[~pos] = -np.expm1((2.0 - lmbda) * np.log1p(-xn)) / (2.0 - lmbda)
    return out


def yeo_johnson_inverse(y: np.ndarray, lmbda: float) -> np.ndarray:
    """The inverse of :func:`yeo_johnson` (where the transform's range allows one)."""
    y = np.asarray(y, dtype=np.float64)
    pos = y >= 0
    out = np.empty_like(y)
    yp, yn = y[pos], y[~pos]
    with np.errstate(invalid="ignore", divide="ignore"):
        if abs(lmbda) < 1e-12:
            out[pos] = np.expm1(yp)
        else:
            out[pos] = np.expm1(np.log1p(lmbda * yp) / lmbda)
        if abs(lmbda - 2.0) < 1e-12:
            out[~pos] = -np.expm1(-yn)
        else:
            out[~pos] = -np.expm1(np.log1p(-(2.0 - lmbda) * yn) / (2.0 - lmbda))
    return out


def masked_margin(logits: np.ndarray, k: np.ndarray) -> np.ndarray:
    """m_k(x) = g_k(x) - max_{i != k} g_i(x), per row; the max excludes k by masking with -inf.

    logits: [N, K] with K >= 2; k: [N] integer class indices. Returns float64 [N].
    """
    g = np.asarray(logits, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with K >= 2, got shape {g.shape}")
    k = np.asarray(k, dtype=np.int64)
    if k.shape != (g.shape[0],):
        raise ValueError(f"class indices must have shape ({g.shape[0]},), got {k.shape}")
    rows = np.arange(g.shape[0])
    own = g[rows, k]
    others = g.copy()
    others[rows, k] = -np.inf
    return own - others.max(axis=1)


def statistic(original_logits: np.ndarray, bounded_logits: np.ndarray) -> np.ndarray:
    """d(x) = m_c(x) - m_c(x; Z) with c = argmax_k g_k(x): how much the bounds shrink the margin
    of the original decision (SPEC 4.2). Returns float64 [N]."""
    g = np.asarray(original_logits)
    gz = np.asarray(bounded_logits)
    if g.shape != gz.shape:
        raise ValueError(f"logit shapes differ: original {g.shape} vs bounded {gz.shape}")
    c = np.argmax(g, axis=1)
    return masked_margin(g, c) - masked_margin(gz, c)


@dataclass(frozen=True)
class Null:
    """The clean-input distribution of d. `gaussian`: N(mu, sigma^2) of d (SPEC 4.3);
    `yeojohnson`: N(mu, sigma^2) of the Yeo-Johnson transform of d with exponent `lmbda` fitted
    by maximum likelihood, for a skewed clean statistic; `empirical`: the sorted held-out clean
    statistics, used for a conformal p-value; `gpd`: those samples for the body, and above the
    threshold `tail_u` (exceeded by a share `tail_zeta` of them) a generalized Pareto tail with
    shape `tail_xi` and scale `tail_beta` (peaks over threshold, the usual estimate of a far
    quantile from a small sample). mu and sigma are the samples' mean and standard deviation
    for `empirical` and `gpd`, for reports only."""

    kind: NullKind
    mu: float
    sigma: float
    samples: tuple[float, ...] = ()
    lmbda: float = 1.0  # Yeo-Johnson exponent; 1 is the identity transform
    tail_u: float = 0.0
    tail_zeta: float = 0.0
    tail_xi: float = 0.0
    tail_beta: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in NULL_KINDS:
            raise ValueError(f"null kind must be one of {NULL_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma)):
            raise ValueError(f"null mu and sigma must be finite, got {self.mu}, {self.sigma}")
        if not math.isfinite(self.lmbda):
            raise ValueError(f"null lmbda must be finite, got {self.lmbda}")
        if self.kind in ("gaussian", "yeojohnson") and self.sigma <= 0:
            raise ValueError(f"{self.kind} null needs sigma > 0, got {self.sigma}")
        if self.kind in ("empirical", "gpd") and len(self.samples) == 0:
            raise ValueError(f"{self.kind} null needs at least one clean statistic")
        if self.kind == "gpd":
            tail = (self.tail_u, self.tail_zeta, self.tail_xi, self.tail_beta)
            if not all(math.isfinite(v) for v in tail):
                raise ValueError(f"gpd null tail parameters must be finite, got {tail}")
            if not (0.0 < self.tail_zeta <= 1.0 and self.tail_beta > 0.0):
                raise ValueError(
                    f"gpd null needs 0 < tail_zeta <= 1 and tail_beta > 0, got "
                    f"{self.tail_zeta}, {self.tail_beta}"
                )
            if self.tail_xi < GPD_MIN_SHAPE:
                raise ValueError(f"gpd null shape must be >= {GPD_MIN_SHAPE}, got {self.tail_xi}")
        # p_values() binary-searches the samples: keep them sorted whatever the source
        object.__setattr__(self, "samples", tuple(sorted(float(v) for v in self.samples)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "mu": self.mu, "sigma": self.sigma}
        out["n"] = len(self.samples)
        if self.kind == "yeojohnson":
            out["lmbda"] = self.lmbda
        if self.kind in ("empirical", "gpd"):
            out["samples"] = list(self.samples)
        if self.kind == "gpd":
            out |= {
                "tail_u": self.tail_u,
                "tail_zeta": self.tail_zeta,
                "tail_xi": self.tail_xi,
                "tail_beta": self.tail_beta,
            }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Null:
        samples = tuple(float(s) for s in d.get("samples", ()))
        return cls(
            kind=d["kind"],
            mu=float(d["mu"]),
            sigma=float(d["sigma"]),
            samples=samples,
            lmbda=float(d.get("lmbda", 1.0)),
            tail_u=float(d.get("tail_u", 0.0)),
            tail_zeta=float(d.get("tail_zeta", 0.0)),
            tail_xi=float(d.get("tail_xi", 0.0)),
            tail_beta=float(d.get("tail_beta", 0.0)),
        )


def fit_null(
    clean_stats: np.ndarray, kind: NullKind = "gaussian", gpd_min_shape: float = GPD_SHAPE_FLOOR
) -> Null:
    """Fit the null on clean statistics: mean and (unbiased) standard deviation of d (of its
    Yeo-Johnson transform for `yeojohnson`, exponent by maximum likelihood, or 0 where a
    negative one would bound the transform so low that a p-value of 1e-4 could not be reached);
    the empirical kind also keeps the sorted samples; gpd: see :func:`fit_gpd_tail`, with its
    shape held at `gpd_min_shape` or above."""
    s = np.asarray(clean_stats, dtype=np.float64).ravel()
    if s.size < 2:
        raise ValueError(f"need at least 2 clean statistics to fit a null, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("clean statistics contain NaN or inf")
    if kind == "gpd":
        u, zeta, xi, beta = fit_gpd_tail(s, gpd_min_shape)
        return Null(
            kind="gpd",
            mu=float(s.mean()),
            sigma=float(s.std(ddof=1)),
            samples=tuple(float(v) for v in s),
            tail_u=u,
            tail_zeta=zeta,
            tail_xi=xi,
            tail_beta=beta,
        )
    lmbda = 1.0
    if kind == "yeojohnson" and np.ptp(s) > 0:
        from scipy.stats import yeojohnson_normmax

        lmbda = float(yeojohnson_normmax(s))
        if lmbda < 0 and not _upper_tail_reachable(s, lmbda):
            lmbda = 0.0  # a log: unbounded above, so every threshold stays reachable
    t = yeo_johnson(s, lmbda) if kind == "yeojohnson" else s
    mu = float(t.mean())
    sigma = float(t.std(ddof=1))
    if kind != "empirical" and sigma <= 0:
        raise ValueError(f"clean statistics are all equal: a {kind} null has zero width")
    samples = tuple(float(v) for v in s) if kind == "empirical" else ()  # Null sorts them
    return Null(kind=kind, mu=mu, sigma=sigma, samples=samples, lmbda=lmbda)


def gpd_min_samples() -> int:
    """The fewest clean statistics a `gpd` null can be fitted on."""
    return math.ceil(GPD_MIN_EXCEEDANCES / GPD_TAIL_FRACTION)


def fit_gpd_tail(
    s: np.ndarray, min_shape: float = GPD_SHAPE_FLOOR
) -> tuple[float, float, float, float]:
    """Peaks over threshold: u is the sample value below the top GPD_TAIL_FRACTION of s, zeta
    the share of s above u, and (xi, beta) the maximum-likelihood generalized Pareto shape and
    scale of the excesses s - u > 0 (shape held at `min_shape`, at least GPD_MIN_SHAPE, scale
    refitted, where the free estimate falls below it). Returns (u, zeta, xi, beta)."""
    if not min_shape >= GPD_MIN_SHAPE:
        raise ValueError(f"the shape's floor must be at least {GPD_MIN_SHAPE}, got {min_shape}")
    from scipy.stats import genpareto

    s = np.sort(np.asarray(s, dtype=np.float64).ravel())
    n = s.size
    if n < gpd_min_samples():
        raise ValueError(f"a gpd null needs at least {gpd_min_samples()} clean statistics, got {n}")
    u = float(s[n - math.ceil(GPD_TAIL_FRACTION * n) - 1])
    excess = s[s > u] - u
    if excess.size < GPD_MIN_EXCEEDANCES:
        raise ValueError(
            f"a gpd null needs {GPD_MIN_EXCEEDANCES} clean statistics above its threshold "
            f"{u:.6g}, got {excess.size} (too many ties)"
        )
    unit = float(excess.mean())  # fitted in units of the mean excess: the fit is scale-free
    y = excess / unit
    xi, _, beta = genpareto.fit(y, floc=0.0)
    if not xi >= min_shape:
        xi = min_shape
        _, _, beta = genpareto.fit(y, f0=xi, floc=0.0)
    # the optimiser can stall; the exponential law with the mean excess (xi = 0, beta = 1 in
    # these units) is a valid candidate when the floor allows it, so never return a fit less
    # likely than it
    exponential = min_shape <= 0.0
    if (
        exponential
        and not genpareto.logpdf(y, xi, scale=beta).sum() >= genpareto.logpdf(y, 0.0).sum()
    ):
        xi, beta = 0.0, 1.0
    return u, excess.size / n, float(xi), float(beta) * unit


def gpd_survival(y: np.ndarray, xi: float, beta: float) -> np.ndarray:
    """P(Y > y) of a generalized Pareto law (shape xi, scale beta) at excesses y >= 0:
    (1 + xi y / beta)^(-1/xi), exp(-y / beta) at xi = 0, and 0 past the end -beta/xi of a
    negative shape."""
    y = np.maximum(np.asarray(y, dtype=np.float64), 0.0)
    if abs(xi) < 1e-12:
        return np.exp(-y / beta)
    base = 1.0 + xi * y / beta
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(base > 0.0, np.power(np.maximum(base, 0.0), -1.0 / xi), 0.0)
    return np.asarray(out, dtype=np.float64)


def gpd_inverse_survival(q: float, xi: float, beta: float) -> float:
    """The excess y with gpd_survival(y) = q, for 0 < q <= 1."""
    if abs(xi) < 1e-12:
        return float(-beta * math.log(q))
    return float(beta / xi * (q ** (-xi) - 1.0))


MIN_REACHABLE_ALPHA = 1e-4
"""A Yeo-Johnson null must be able to flag at every alpha down to this one."""


def _upper_tail_reachable(s: np.ndarray, lmbda: float) -> bool:
    """With lmbda < 0 the transform is bounded above by -1/lmbda, so p-values have a floor; is
    it below MIN_REACHABLE_ALPHA (so that any usable alpha can still flag)?"""
    from scipy.special import ndtri

    t = yeo_johnson(s, lmbda)
    top = t.mean() + t.std(ddof=1) * ndtri(1.0 - MIN_REACHABLE_ALPHA)
    return bool(top < -1.0 / lmbda)


def p_values(null: Null, d: np.ndarray) -> np.ndarray:
    """Upper-tail p-values of d under the null.

    gaussian: p = 1 - Phi((d - mu) / sigma)  (SPEC 4.3), computed as Phi(-(d - mu) / sigma) to
    keep precision in the tail. yeojohnson: the same on the transformed d. empirical:
    p = (1 + #{d_i >= d}) / (n + 1), the conformal p-value. gpd: that conformal p-value up to
    the threshold u, and p = zeta * (1 + xi (d - u) / beta)^(-1/xi) above it.
    """
    d = np.asarray(d, dtype=np.float64)
    if null.kind == "gaussian":
        return np.asarray(ndtr(-(d - null.mu) / null.sigma), dtype=np.float64)
    if null.kind == "yeojohnson":
        t = yeo_johnson(d, null.lmbda)
        return np.asarray(ndtr(-(t - null.mu) / null.sigma), dtype=np.float64)
    ref = np.asarray(null.samples, dtype=np.float64)
    n_ge = ref.size - np.searchsorted(ref, d, side="left")
    p = (1.0 + n_ge) / (ref.size + 1.0)
    if null.kind == "gpd":
        tail = null.tail_zeta * gpd_survival(d - null.tail_u, null.tail_xi, null.tail_beta)
        p = np.where(d > null.tail_u, tail, p)
    return np.asarray(p, dtype=np.float64)


def threshold(null: Null, alpha: float) -> float:
    """The smallest-in-spirit statistic value flagged at level alpha (for reports and dashboards).

    gaussian: mu + sigma * Phi^{-1}(1 - alpha). empirical: the lowest sample value whose
    conformal p-value is below alpha (inf if no value can reach it). gpd: u plus the tail's
    excess at survival alpha / zeta when alpha <= zeta, else the empirical threshold.
    """
    from scipy.special import ndtri

    if null.kind == "gaussian":
        return float(null.mu + null.sigma * ndtri(1.0 - alpha))
    if null.kind == "yeojohnson":
        t = null.mu + null.sigma * ndtri(1.0 - alpha)
        d = float(yeo_johnson_inverse(np.array([t]), null.lmbda)[0])
        return d if math.isfinite(d) else math.inf  # beyond the transform's range: never
    if null.kind == "gpd" and alpha <= null.tail_zeta:
        excess = gpd_inverse_survival(alpha / null.tail_zeta, null.tail_xi, null.tail_beta)
        return null.tail_u + excess
    ref = np.asarray(null.samples, dtype=np.float64)
    n = ref.size
    # largest m = #{d_i >= d} with (1 + m) / (n + 1) < alpha, found with the very division
    # p_values() performs, so the threshold agrees with it exactly
    m = max(math.ceil(alpha * (n + 1)) - 2, -1)
    while m + 1 <= n and (1.0 + (m + 1)) / (n + 1.0) < alpha:
        m += 1
    while m >= 0 and (1.0 + m) / (n + 1.0) >= alpha:
        m -= 1
    if m < 0:
        return math.inf
    if m >= n:
        return -math.inf
    # d just above the (n - m)-th smallest sample leaves m samples >= d
    return float(np.nextafter(ref[n - m - 1], np.inf))


@dataclass(frozen=True)
class DecisionRule:
    """alpha: flag when p < alpha. flag_on_disagreement: also flag when the two networks'
    decisions differ (the paper's extra rule; off by default, SPEC 4.4)."""

    alpha: float = 0.005
    flag_on_disagreement: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class Decisions:
    """Per-input MMDF outcome, arrays of length N."""

    label: np.ndarray  # int64, the guarded decision
    flagged: np.ndarray  # bool
    p_value: np.ndarray  # float64
    statistic: np.ndarray  # float64
    original_label: np.ndarray  # int64
    bounded_label: np.ndarray  # int64
    logits: np.ndarray  # float32 [N, K]: original logits, bounded ones where flagged


def best_other_class(bounded_logits: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmax_{k != c} g_k(x; Z) per row: the correction of a flagged input (SPEC 4.5)."""
    masked = np.asarray(bounded_logits, dtype=np.float64).copy()
    masked[np.arange(masked.shape[0]), c] = -np.inf
    return np.argmax(masked, axis=1).astype(np.int64)


def guarded_labels(c: np.ndarray, bounded_logits: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """The guarded decision: the original one (c), or for a flagged input the bounded network's
    best class other than c (SPEC 4.5)."""
    return np.where(flagged, best_other_class(bounded_logits, c), c)


def bonferroni(*p: np.ndarray) -> np.ndarray:
    """One p-value from several tests of the same input: min(1, m * min_i p_i). It is below
    alpha exactly when some p_i is below alpha / m, so flagging on it keeps the nominal
    false-positive rate at alpha whatever the tests' dependence."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in p])
    return np.minimum(1.0, len(p) * stacked.min(axis=0))


def range_statistic(ratios: np.ndarray) -> np.ndarray:
    """The range detector's statistic: the largest, over the bound sites, of an input's
    activation relative to its channel's clean scale (about the 99th percentile of its
    per-image maxima on the clean calibration images). `ratios` [N, S] holds, per site, max
    over channels (and positions) of activation / clean scale, as the
    range detector's output of the original network computes it (channels never active on
    the clean images count 0). Returns float64 [N]."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 1:
        raise ValueError(f"activation ratios must have shape (N, sites >= 1), got {r.shape}")
    return r.max(axis=1)


@dataclass(frozen=True)
class RangeDetector:
    """A detection statistic read off the original network's own forward pass (no extra
    network): :func:`range_statistic`, with its own null. Combined with the other p-values by
    :func:`bonferroni`; corrections still come from the learned bounds."""

    ratios: np.ndarray  # float [N, S]: the original network's activation ratios per bound site
    null: Null


@dataclass(frozen=True)
class StartDetector:
    """A second statistic for detection only: d(x) under the start bounds (each channel near its
    clean maximum) instead of the learned ones, with its own null. Combined with the learned
    bounds' p-value by :func:`bonferroni`; corrections still come from the learned bounds."""

    logits: np.ndarray  # float [N, K]: the start-bounded network's logits
    null: Null


def decide(
    original_logits: np.ndarray,
    bounded_logits: np.ndarray,
    null: Null,
    rule: DecisionRule,
    start: StartDetector | None = None,
    range_detector: RangeDetector | None = None,
) -> Decisions:
    """SPEC 4.1-4.5: unflagged inputs keep the original decision and logits; flagged ones get
    argmax_{k != c} g_k(x; Z), the bounded network's best class other than the original one.

    With a start and/or a range detector, p is the Bonferroni combination of all the
    statistics' p-values (the statistic reported stays the learned bounds' d)."""
    g = np.asarray(original_logits, dtype=np.float32)
    gz = np.asarray(bounded_logits, dtype=np.float32)
    d = statistic(g, gz)
    p = p_values(null, d)
    others = []
    if start is not None:
        d_start = statistic(g, np.asarray(start.logits, dtype=np.float32))
        others.append(p_values(start.null, d_start))
    if range_detector is not None:
        others.append(p_values(range_detector.null, range_statistic(range_detector.ratios)))
    if others:
        p = bonferroni(p, *others)
    c = np.argmax(g, axis=1).astype(np.int64)
    cz = np.argmax(gz, axis=1).astype(np.int64)
    flagged = p < rule.alpha
    if rule.flag_on_disagreement:
        flagged |= c != cz
    label = guarded_labels(c, gz, flagged)
    logits = np.where(flagged[:, None], gz, g).astype(np.float32)
    return Decisions(label, flagged, p, d, c, cz, logits)
