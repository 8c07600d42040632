"""Known-answer tests for the guard's figures on clean and triggered inputs (calibrate/scoring.py):
AUROC, the ROC curve, the suspicion score, and the attack figures from decisions."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.scoring import attack_figures, auroc, roc_curve, suspicion, undefended_figures
from guard.mmdf import Decisions


def test_auroc_known_answers() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    # one tie between a negative and a positive counts half: pairs (1,1)=0.5, (1,2)=1, (0,*)=1
    assert auroc(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(3.5 / 4)
    assert auroc(np.ones(5), np.ones(7)) == 0.5


def test_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 40), rng.normal(0.7, 1, 30)
    pairs = (pos[None, :] > neg[:, None]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs)


def test_auroc_refuses_empty_side() -> None:
    with pytest.raises(ValueError, match="at least one"):
        auroc(np.array([]), np.array([1.0]))


def test_roc_curve_area_equals_auroc() -> None:
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    fpr, tpr = roc_curve(neg, pos)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(neg, pos))


def _decisions(label: list[int], flagged: list[bool]) -> Decisions:
    n = len(label)
    lab = np.array(label, dtype=np.int64)
    zeros = np.zeros(n)
    return Decisions(lab, np.array(flagged), zeros, zeros, lab, lab, np.zeros((n, 3), np.float32))


def test_attack_figures_known_answers() -> None:
    clean = _decisions([0, 1, 2, 2], [False, False, True, False])
    trig = _decisions([0, 1, 2, 0, 0], [False, True, True, False, True])
    f = attack_figures(clean, np.array([0, 1, 1, 2]), trig, np.array([1, 1, 2, 2, 1]),
                       np.zeros(5, dtype=np.int64))  # fmt: skip
    assert f == {"clean_accuracy": 0.75, "fpr": 0.25, "asr": 0.6, "restored": 0.4, "tpr": 0.6}


def test_attack_figures_refuse_mismatched_labels() -> None:
    clean = _decisions([0, 1], [False, False])
    trig = _decisions([0, 1], [True, True])
    with pytest.raises(ValueError, match="one entry per input"):
        attack_figures(clean, np.array([0, 1]), trig, np.array([1, 1]), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="one entry per input"):
        attack_figures(clean, np.array([0]), trig, np.array([1, 1]), np.zeros(2, np.int64))


def test_undefended_figures_known_answers() -> None:
    f = undefended_figures(
        np.array([0, 1, 1]), np.array([0, 1, 2]), np.array([0, 0, 3, 2]), np.array([1, 2, 3, 2]),
        np.array([0, 0, 0, 3]),
    )  # fmt: skip
    assert f == pytest.approx({"clean_accuracy": 2 / 3, "asr": 0.5, "restored": 0.5})


def test_suspicion_orders_like_the_p_value_reversed() -> None:
    p = np.array([1.0, 0.1, 1e-3, 0.0])
    s = suspicion(p)
    assert s[:3] == pytest.approx([0.0, 1.0, 3.0])
    assert s[3] == np.inf
    assert auroc(suspicion(np.array([0.5, 0.2])), suspicion(np.array([1e-4, 0.0]))) == 1.0
