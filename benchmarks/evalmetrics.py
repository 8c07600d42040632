"""Pure numpy metrics for the benchmarks: a detector's power at a matched clean flag rate (AUROC
and the ROC curve: calibrate/scoring.py; STRIP's entropy and threshold: calibrate/strip.py,
imported here for the benchmarks).

No I/O and no model here, so each function has a known-answer test (tests/test_evalmetrics.py).
"""

from __future__ import annotations

import numpy as np

from calibrate.strip import low_tail_threshold, softmax, strip_blend, strip_entropy

__all__ = ["low_tail_threshold", "softmax", "strip_blend", "strip_entropy", "tpr_at_fpr"]


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, achieved FPR) of flagging ``score > t`` with t set on the negatives themselves so
    that at most a fraction ``fpr`` of them is flagged: a detector's power at a matched clean
    flag rate, whatever its null (an oracle threshold, for comparing statistics, not a rule)."""
    t = -low_tail_threshold(-np.asarray(neg, dtype=np.float64), fpr)
    return float(np.mean(np.asarray(pos) > t)), float(np.mean(np.asarray(neg) > t))
