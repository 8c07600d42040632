"""MM-BD (SPEC section 5): is the model backdoored at all? Per-class maximum achievable margins,
a Gamma null on the non-largest ones, and an order-statistic p-value for the largest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Verdict:
    r: tuple[float, ...]  # per-class maximum margin
    target: int  # argmax_k r_k, the suspected target class
    p_value: float
    suspected: bool
    alpha: float
    shape: float
    loc: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": list(self.r),
            "target": self.target,
            "p_value": self.p_value,
            "suspected": self.suspected,
            "alpha": self.alpha,
            # no Gamma was fitted to a degenerate null (all other margins equal): null, not NaN,
            # which the manifest's JSON refuses
            "gamma": (
                {"shape": self.shape, "loc": self.loc, "scale": self.scale}
                if np.isfinite(self.shape)
                else None
            ),
        }


def max_order_pvalue(r_max: float, shape: float, loc: float, scale: float, k: int) -> float:
    """p = 1 - F(r_max)^K: the chance that the largest of K draws from the null Gamma(shape, loc,
    scale) reaches r_max. Computed as -expm1(K log F) to keep precision when F is near 1."""
    log_f = float(stats.gamma.logcdf(r_max, shape, loc=loc, scale=scale))
    return float(-np.expm1(k * log_f))


def verdict(r: np.ndarray, alpha: float = 0.05) -> Verdict:
    """Fit Gamma(shape, loc, scale) by maximum likelihood to the K-1 margins other than the
    largest and test the largest against the distribution of a maximum of K draws."""
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 1 or r.size < 3:
        raise ValueError(f"MM-BD needs at least 3 per-class margins, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("MM-BD margins contain NaN or inf")
    target = int(np.argmax(r))
    rest = np.delete(r, target)
    if np.ptp(rest) <= 1e-12 * max(1.0, abs(float(rest.mean()))):
        # a degenerate null: any larger maximum is infinitely unlikely, an equal one is not
        p = 0.0 if r[target] > rest.max() else 1.0
        return Verdict(tuple(r.tolist()), target, p, p < alpha, alpha, float("nan"), 0.0, 0.0)
    shape, loc, scale = stats.gamma.fit(rest)
    p = max_order_pvalue(float(r[target]), shape, loc, scale, r.size)
    return Verdict(tuple(r.tolist()), target, p, p < alpha, alpha, shape, loc, scale)
