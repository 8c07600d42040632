"""Held-out clean figures for the report: accuracy before/after, agreement, and the MMDF
false-positive rate measured on images the null was not fitted on (2-fold cross-fit)."""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrate.config import CalibrationConfig
from guard.mmdf import (
    DecisionRule,
    RangeDetector,
    StartDetector,
    decide,
    fit_null,
    range_statistic,
    statistic,
)

FPR_METHOD = (
    "2-fold cross-fit on the held-out clean images: the null is fitted on one half and the "
    "flags are counted on the other, both ways"
)


def cross_fitted_decisions(
    g: np.ndarray,
    gz: np.ndarray,
    cfg: CalibrationConfig,
    disagreement: bool,
    gs: np.ndarray | None = None,
    ratios: np.ndarray | None = None,
    range_extra: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Guarded labels and flags for every held-out image, each decided by a null fitted on the
    other fold, so the flag rate estimates the false-positive rate honestly. gs: the start
    detector's logits, ratios: the range detector's activation ratios (their nulls are
    cross-fitted the same way), or None. range_extra: range statistics of other clean images
    (the learning images' leave-one-out ones) that every fold's range null is also fitted on."""
    n = g.shape[0]
    order = np.random.default_rng(cfg.seed + 7).permutation(n)
    folds = (order[: n // 2], order[n // 2 :])
    labels = np.empty(n, dtype=np.int64)
    flagged = np.empty(n, dtype=bool)
    rule = DecisionRule(alpha=cfg.alpha, flag_on_disagreement=disagreement)
    d = statistic(g, gz)
    d_start = None if gs is None else statistic(g, gs)
    d_range = None if ratios is None else range_statistic(ratios)
    for fit_idx, eval_idx in (folds, folds[::-1]):
        null = fit_null(d[fit_idx], cfg.null_kind)
        start = None
        if gs is not None and d_start is not None:
            start = StartDetector(gs[eval_idx], fit_null(d_start[fit_idx], cfg.start_null))
        ranged = None
        if ratios is not None and d_range is not None:
            fit_on = d_range[fit_idx]
            if range_extra is not None:
                fit_on = np.concatenate([fit_on, range_extra])
            null_r = fit_null(fit_on, cfg.range_null)
            ranged = RangeDetector(ratios[eval_idx], null_r)
        dec = decide(g[eval_idx], gz[eval_idx], null, rule, start, ranged)
        labels[eval_idx] = dec.label
        flagged[eval_idx] = dec.flagged
    return labels, flagged


FPR_CONFIDENCE = 0.95


def rate_upper_bound(k: int, n: int, confidence: float = FPR_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a rate seen k times in n trials: the
    rate u at which seeing k or fewer has probability 1 - confidence (1 when k = n). With k = 0
    it is 1 - (1 - confidence)^(1/n): 3.7% for 80 images at 95%."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"{k} of {n}: need 0 <= k <= n and n >= 1")
    if k == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


def heldout_figures(
    g: np.ndarray,
    gz: np.ndarray,
    y: np.ndarray,
    cfg: CalibrationConfig,
    gs: np.ndarray | None = None,
    ratios: np.ndarray | None = None,
    range_extra: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy and cross-fitted false-positive rates on the held-out images; with the start
    detector's logits gs and/or the range detector's ratios (and range_extra, as
    `cross_fitted_decisions` takes it), the flags are the combined rule's."""
    if g.shape[0] < 4:
        raise ValueError(f"need at least 4 held-out images for the figures, got {g.shape[0]}")
    c, cz = g.argmax(axis=1), gz.argmax(axis=1)
    by_rule = {
        dis: cross_fitted_decisions(g, gz, cfg, dis, gs, ratios, range_extra)
        for dis in (False, True)
    }
    labels, flagged = by_rule[cfg.flag_on_disagreement]
    flagged_plain, flagged_dis = by_rule[False][1], by_rule[True][1]
    return {
        "n": int(y.size),
        "accuracy_original": float(np.mean(c == y)),
        "accuracy_bounded": float(np.mean(cz == y)),
        "accuracy_guarded": float(np.mean(labels == y)),
        "agreement": float(np.mean(c == cz)),
        "false_positive_rate": float(np.mean(flagged_plain)),
        # how high the rate could be, given what so few images can show
        "false_positive_rate_upper95": rate_upper_bound(int(np.sum(flagged_plain)), int(y.size)),
        "false_positive_rate_with_disagreement": float(np.mean(flagged_dis)),
        "flag_rate_configured_rule": float(np.mean(flagged)),
        "fpr_method": FPR_METHOD,
    }


PROBABILITY_SUM_TOLERANCE = 1e-3


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Whether a network's outputs [N, K] (K >= 2) are class probabilities rather than logits:
    every value in [0, 1] and every row summing to 1 (within PROBABILITY_SUM_TOLERANCE), as a
    network ending in a softmax returns. Log-probabilities are not flagged: their differences
    are the logits' differences, which is all the margins use."""
    z = np.asarray(outputs, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or z.size == 0 or not np.isfinite(z).all():
        return False
    in_unit = bool(z.min() >= 0.0 and z.max() <= 1.0)
    return in_unit and bool(np.all(np.abs(z.sum(axis=1) - 1.0) <= PROBABILITY_SUM_TOLERANCE))


def clean_set_figures(
    predicted: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    outputs: np.ndarray | None = None,
) -> dict[str, Any]:
    """How the original network does on the whole clean set (learning and held-out images):
    its accuracy, and the class it predicts most often with the share of images it goes to (on
    a balanced set about 1 / num_classes for a network that works; most images in one class
    points at mismatched preprocessing, or at a trigger in the clean set). With its `outputs`
    [N, K], also whether they are probabilities rather than logits (`looks_like_probabilities`)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.size == 0:
        raise ValueError(f"{predicted.size} predictions for {labels.size} labels")
    counts = np.bincount(predicted, minlength=num_classes)
    top = int(counts.argmax())
    figures: dict[str, Any] = {
        "images": int(labels.size),
        "accuracy_original": float(np.mean(predicted == labels)),
        "chance": 1.0 / num_classes,
        "most_predicted_class": top,
        "most_predicted_share": float(counts[top] / labels.size),
    }
    if outputs is not None:
        figures["outputs_are_probabilities"] = looks_like_probabilities(outputs)
    return figures
