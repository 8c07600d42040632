"""Pure numpy metrics for the benchmarks: STRIP's entropy and its threshold, and a detector's
power at a matched clean flag rate (AUROC and the ROC curve: calibrate/scoring.py).

No I/O and no model here, so each function has a known-answer test (tests/test_evalmetrics.py).
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def strip_entropy(blend_logits: np.ndarray) -> np.ndarray:
    """STRIP's score per input: the mean Shannon entropy (bits) of the softmax over its blends.

    ``blend_logits`` is (inputs, blends, classes). A trojaned input keeps its (target) class
    whatever it is blended with, so its entropy is low.
    """
    p = softmax(blend_logits)
    h = -np.sum(p * np.log2(np.clip(p, 1e-300, None)), axis=-1)
    return h.mean(axis=-1)


def strip_blend(x: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """STRIP's superimposition (``cv2.addWeighted(bg, 1, x, 1, 0)``): saturating uint8 sum.

    x: (H, W, C) uint8; backgrounds: (B, H, W, C) uint8 -> (B, H, W, C) uint8.
    """
    total = np.asarray(backgrounds, dtype=np.int16) + np.asarray(x, dtype=np.int16)[None]
    return np.clip(total, 0, 255).astype(np.uint8)


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, achieved FPR) of flagging ``score > t`` with t set on the negatives themselves so
    that at most a fraction ``fpr`` of them is flagged: a detector's power at a matched clean
    flag rate, whatever its null (an oracle threshold, for comparing statistics, not a rule)."""
    t = -low_tail_threshold(-np.asarray(neg, dtype=np.float64), fpr)
    return float(np.mean(np.asarray(pos) > t)), float(np.mean(np.asarray(neg) > t))


def low_tail_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """Threshold t such that flagging ``score < t`` flags at most a fraction ``fpr`` of the clean
    scores it was set on (the empirical lower quantile; STRIP flags low entropy)."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no clean scores to set the threshold on")
    k = int(np.floor(fpr * s.size))
    return float(s[k]) if k < s.size else float(np.inf)
