"""Pure numpy figures of a guard on labelled clean and triggered inputs: what `mmguard
evaluate` prints and the benchmarks tabulate. No I/O and no model here, so each function has a
known-answer test (tests/test_scoring.py)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from guard.mmdf import Decisions


def auroc(negative_scores: np.ndarray, positive_scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half).

    The Mann-Whitney U statistic over the pooled ranks; higher scores mean "more suspicious".
    """
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("AUROC needs at least one negative and one positive score")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def roc_curve(
    negative_scores: np.ndarray, positive_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) for every threshold "score >= t", from (0, 0)
    to (1, 1)."""
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())
    pos = np.sort(np.asarray(positive_scores, dtype=np.float64).ravel())
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = neg.size - np.searchsorted(neg, thresholds, side="left")
    tpr = pos.size - np.searchsorted(pos, thresholds, side="left")
    fpr = np.concatenate([[0.0], fpr / neg.size])
    tpr = np.concatenate([[0.0], tpr / pos.size])
    return fpr, tpr


def suspicion(p: np.ndarray) -> np.ndarray:
    """-log10 p: the guard's p-value as a score that grows with suspicion (for ROC curves and
    AUROC; p = 0, which a gpd tail can return, scores +inf and ranks above every finite one)."""
    with np.errstate(divide="ignore"):
        return -np.log10(np.asarray(p, dtype=np.float64))


def attack_figures(
    clean: Decisions,
    clean_labels: np.ndarray,
    triggered: Decisions,
    true_labels: np.ndarray,
    attacker_labels: np.ndarray,
) -> dict[str, float]:
    """The guard's figures on clean inputs (their true labels) and triggered ones (their true
    labels and the label the attacker wants), as fractions: clean accuracy and flag rate (the
    false-positive rate); attack success (the guarded label is the attacker's), triggered
    inputs restored to their true class, and their flag rate (the true-positive rate)."""
    y = np.asarray(clean_labels)
    ty, attacker = np.asarray(true_labels), np.asarray(attacker_labels)
    if clean.label.shape != y.shape or not triggered.label.shape == ty.shape == attacker.shape:
        raise ValueError("decisions and labels must have one entry per input")
    return {
        "clean_accuracy": float(np.mean(clean.label == y)),
        "fpr": float(np.mean(clean.flagged)),
        "asr": float(np.mean(triggered.label == attacker)),
        "restored": float(np.mean(triggered.label == ty)),
        "tpr": float(np.mean(triggered.flagged)),
    }


def undefended_figures(
    clean_original: np.ndarray,
    clean_labels: np.ndarray,
    triggered_original: np.ndarray,
    true_labels: np.ndarray,
    attacker_labels: np.ndarray,
) -> dict[str, float]:
    """The original network's decisions (labels, not logits) on the same inputs: its clean
    accuracy, attack success and triggered inputs still classified as their true class."""
    c, tc = np.asarray(clean_original), np.asarray(triggered_original)
    return {
        "clean_accuracy": float(np.mean(c == np.asarray(clean_labels))),
        "asr": float(np.mean(tc == np.asarray(attacker_labels))),
        "restored": float(np.mean(tc == np.asarray(true_labels))),
    }
