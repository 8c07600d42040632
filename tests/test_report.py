"""Tests for the calibration report writer: files, strict JSON, verdict wording, figures."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibrate.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["airplane", "cat", "dog", "ship"]
SITES = ["features.1", "features.4", "classifier.1"]


def fake_report(suspected: bool = True) -> dict[str, Any]:
    """A realistic K=4, 3-site, 20-iteration report with one NaN (an unmeasured margin)."""
    rng = np.random.default_rng(7)
    k = len(CLASS_NAMES)
    before = [4.1, 19.7, 5.0, 3.8] if suspected else [4.1, 4.6, 5.0, 3.8]
    bounds = []
    for site, kind, channels, init_max in zip(
        SITES, ["conv", "conv", "linear"], [16, 32, 64], [2.5, 8.0, 300.0], strict=True
    ):
        values = rng.uniform(0.0, init_max, channels).round(4).tolist()
        values[0] = 0.0  # a channel driven to zero must not break the log axis
        bounds.append(
            {
                "site": site,
                "kind": kind,
                "channels": channels,
                "init_mean": init_max / 2,
                "init_max": init_max,
                "final_min": min(values),
                "final_mean": float(np.mean(values)),
                "final_median": float(np.median(values)),
                "final_max": max(values),
                "fraction_reduced": 0.8125,
                "values": values,
            }
        )
    history = [
        {
            "iter": 10 * i,
            "loss": 5.0 * math.exp(-i / 5) + 0.3,
            "fidelity": 0.2 + 0.01 * i,
            "margin": 4.0 * math.exp(-i / 4),
            "lambda": 0.01 * 1.5**i,
            "agreement": min(1.0, 0.9 + 0.006 * i),
        }
        for i in range(20)
    ]
    return {
        "schema_version": 1,
        "model_name": "cifar4-badnet",
        "created_utc": "2025-01-02T03:04:05Z",
        "model": {
            "source": "models/cifar4.pt",
            "num_classes": k,
            "class_names": list(CLASS_NAMES),
            "input_shape": [3, 32, 32],
        },
        "objective": "mmac",
        "config": {"lr": 0.01, "iters": 200, "lambda_init": 0.01, "use_amp": False, "x": "a|b"},
        "split": {
            "seed": 1234,
            "heldout_fraction": 0.5,
            "learn": 400,
            "heldout": 400,
            "learn_per_class": [100] * k,
            "heldout_per_class": [100] * k,
            "learn_used": 371,
            "learn_dropped_misclassified": 29,
        },
        "heldout": {
            "accuracy_original": 0.9275,
            "accuracy_bounded": 0.9125,
            "accuracy_guarded": 0.9,
            "agreement": 0.9650,
            "false_positive_rate": 0.0123,
            "false_positive_rate_with_disagreement": 0.0456,
            "fpr_method": "heldout-empirical",
        },
        "null": {
            "kind": "gaussian",
            "mu": 0.5,
            "sigma": 0.2,
            "n": 371,
            "alpha": 0.01,
            "threshold": 0.9653,
        },
        "clean_statistics": rng.normal(0.5, 0.2, 400).round(5).tolist(),
        "max_margins": {"before": before, "after": [2.0, 2.2, float("nan"), 1.9]},
        "mmbd": {
            "r": before,
            "target": 1,
            "p_value": 3.2e-6 if suspected else 0.4123,
            "suspected": suspected,
            "alpha": 0.05,
            "gamma": {"shape": 12.3, "loc": 0.0, "scale": 0.35},
        },
        "bounds": bounds,
        "history": history,
        "timing_s": {"total": 312.5, "fit": 250.0, "null": 12.25},
    }


def test_writes_all_files(tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(fake_report(), out)
    names = {p.name for p in paths}
    expected = {"report.json", "report.md"} | {
        f"{n}.png" for n in ("margins", "statistic", "bounds", "history")
    }
    assert names == expected
    assert len(paths) == len(names)
    assert {p.name for p in out.iterdir()} == expected
    for path in paths:
        assert path.parent == out
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(PNG_SIGNATURE), path.name
            assert len(data) > 10_000, path.name


def test_json_round_trips_with_nan_as_null(tmp_path: Path) -> None:
    report = fake_report()
    original = copy.deepcopy(report)
    write_report(report, tmp_path)
    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    expected = copy.deepcopy(report)
    expected["max_margins"]["after"][2] = None
    assert json.loads(text) == expected
    assert list(json.loads(text)) == list(report)  # key order kept (sort_keys=False)
    assert str(report) == str(original)  # the input dict is not modified


def test_markdown_content(tmp_path: Path) -> None:
    write_report(fake_report(), tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# MMGuard calibration report: cifar4-badnet")
    first_paragraph = md.split("\n\n")[1]
    assert "backdoor suspected, target class cat (p = 3.20e-06)" in first_paragraph
    assert "1.23%" in md and "4.56%" in md  # FPR without and with disagreement rule
    assert "heldout-empirical" in md
    for site in SITES:
        assert sum(line.startswith(f"| {site} |") for line in md.splitlines()) == 1
    assert "n/a" in md  # the NaN margin
    assert "a\\|b" in md  # pipes in config values do not break the table
    for name in ("margins", "statistic", "bounds", "history"):
        assert f"]({name}.png)" in md


def test_markdown_does_not_list_raw_bound_values(tmp_path: Path) -> None:
    report = fake_report()
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    raw = report["bounds"][2]["values"]
    assert sum(str(v) in md for v in raw[1:]) < 3  # at most coincidental matches


def test_not_suspected(tmp_path: Path) -> None:
    write_report(fake_report(suspected=False), tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "no backdoor detected (p = 0.412)" in md
    assert "backdoor suspected" not in md


def test_empty_history_skips_figure(tmp_path: Path) -> None:
    report = fake_report()
    report["history"] = []
    paths = write_report(report, tmp_path)
    assert "history.png" not in {p.name for p in paths}
    assert not (tmp_path / "history.png").exists()
    assert "history.png" not in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_empirical_null_and_empty_lists(tmp_path: Path) -> None:
    report = fake_report()
    report["null"]["kind"] = "empirical"
    report["clean_statistics"] = []
    report["bounds"][0]["values"] = []
    paths = write_report(report, tmp_path)
    assert (tmp_path / "statistic.png") in paths


def test_gpd_null_parameters_are_in_the_markdown(tmp_path: Path) -> None:
    report = fake_report()
    report["null"].update(kind="gpd", tail_u=0.75, tail_zeta=0.2, tail_xi=0.125, tail_beta=0.0625)
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    for row in (
        "| Tail threshold u | 0.75 |",
        "| Tail shape xi | 0.125 |",
        "| Share above u | 0.2 |",
    ):
        assert row in md
    assert "Yeo-Johnson exponent" not in md


def test_non_json_value_names_key(tmp_path: Path) -> None:
    report = fake_report()
    report["bounds"][1]["values"] = np.zeros(3)
    with pytest.raises(TypeError, match=r"\['bounds'\]\[1\]\['values'\]"):
        write_report(report, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_null_fit_advice_only_when_a_gaussian_null_misfits(tmp_path: Path) -> None:
    from calibrate.report import null_fit_advice

    report = fake_report()
    report["null"].update(kind="gaussian", alpha=0.005)
    report["heldout"]["false_positive_rate"] = 0.0123  # 2.5 x alpha
    advice = null_fit_advice(report)
    assert advice is not None and "--null yeojohnson" in advice and "1.23%" in advice
    write_report(report, tmp_path)
    assert "--null yeojohnson" in (tmp_path / "report.md").read_text()
    report["heldout"]["false_positive_rate"] = 0.01  # exactly 2 x alpha: within noise
    assert null_fit_advice(report) is None
    report["heldout"]["false_positive_rate"] = 0.05
    report["null"]["kind"] = "yeojohnson"  # advice is about the Gaussian only
    assert null_fit_advice(report) is None


def test_clean_set_figures_by_hand() -> None:
    from calibrate.evaluation import clean_set_figures

    got = clean_set_figures(np.array([0, 1, 1, 1, 3, 1]), np.array([0, 1, 2, 3, 3, 2]), 4)
    assert got == {
        "images": 6,
        "accuracy_original": 0.5,  # images 0, 1 and 4
        "chance": 0.25,
        "most_predicted_class": 1,
        "most_predicted_share": pytest.approx(4 / 6),
    }
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        clean_set_figures(np.array([0, 1]), np.array([0, 1, 1]), 2)


def test_probabilities_are_told_from_logits() -> None:
    from calibrate.evaluation import clean_set_figures, looks_like_probabilities

    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert looks_like_probabilities(probs)
    assert not looks_like_probabilities(logits)
    assert not looks_like_probabilities(np.log(probs))  # log-probabilities keep the margins
    off = probs.copy()
    off[0] *= 1.01  # a row summing to 1.01
    assert not looks_like_probabilities(off)
    assert not looks_like_probabilities(np.array([[1.0], [1.0]]))  # one class: nothing to tell
    assert not looks_like_probabilities(np.array([[np.nan, 1.0]]))
    got = clean_set_figures(probs.argmax(1), np.array([0, 2]), 3, probs)
    assert got["outputs_are_probabilities"] is True
    assert "outputs_are_probabilities" not in clean_set_figures(np.array([0]), np.array([0]), 3)


def test_rate_upper_bound_known_values() -> None:
    from scipy.stats import binom

    from calibrate.evaluation import rate_upper_bound

    # none seen: 1 - (1 - confidence)^(1/n), the "rule of three" region
    assert rate_upper_bound(0, 80) == pytest.approx(1 - 0.05 ** (1 / 80), rel=1e-9)
    assert rate_upper_bound(0, 80) == pytest.approx(0.0368, abs=1e-4)
    assert rate_upper_bound(0, 1000) == pytest.approx(0.002991, abs=1e-6)
    # k seen: the rate at which k or fewer has probability 5%
    for k, n in ((1, 200), (4, 80), (10, 500)):
        u = rate_upper_bound(k, n)
        assert k / n < u < 1
        assert binom.cdf(k, n, u) == pytest.approx(0.05, abs=1e-9)
    assert rate_upper_bound(5, 5) == 1.0
    assert rate_upper_bound(2, 80, confidence=0.99) > rate_upper_bound(2, 80)
    with pytest.raises(ValueError, match="3 of 2"):
        rate_upper_bound(3, 2)
    with pytest.raises(ValueError, match="0 of 0"):
        rate_upper_bound(0, 0)


def test_report_and_summary_give_the_rates_upper_bound(tmp_path: Path) -> None:
    from calibrate.cli import summary

    report = fake_report()
    report["heldout"].update(n=80, false_positive_rate=0.0, false_positive_rate_upper95=0.0368)
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| False-positive rate, 95% upper bound over 80 images (Clopper-Pearson) | 3.68% |" in md
    report.update(iterations=3, timing_s={"total": 1.0})
    report["heldout"].update(accuracy_guarded=0.8, agreement=0.9)
    text = summary(report, tmp_path)
    assert "false-positive rate 0.00% at alpha" in text
    assert "(at most 3.68% at 95% confidence, from 80 held-out images)" in text
    del report["heldout"]["false_positive_rate_upper95"]  # a report from before the bound
    assert "at most" not in summary(report, tmp_path)


def _with_clean_set(acc: float, share: float, k: int = 4, top: int = 2) -> dict[str, Any]:
    report = fake_report()
    report["clean_set"] = {
        "images": 200,
        "accuracy_original": acc,
        "chance": 1 / k,
        "most_predicted_class": top,
        "most_predicted_share": share,
    }
    return report


def test_clean_set_advice_near_chance_or_one_class(tmp_path: Path) -> None:
    from calibrate.report import clean_set_advice

    # K = 4: chance 25%, warned below 25 + 0.25 x 75 = 43.75%
    assert clean_set_advice(_with_clean_set(0.4375, 0.3)) is None
    low = clean_set_advice(_with_clean_set(0.43, 0.3))
    assert low is not None
    assert "43.00% of the 200 clean images correctly (chance 25.00%)" in low
    assert "predicts dog for 30.00%" in low and "--mean/--std" in low
    # a working network that sends half of a balanced set to one class
    assert clean_set_advice(_with_clean_set(0.9, 0.49)) is None
    assert clean_set_advice(_with_clean_set(0.9, 0.5)) is not None
    # with two classes one class takes half by chance: only accuracy counts
    report = _with_clean_set(0.9, 0.95, k=2, top=1)
    report["model"]["class_names"] = ["a", "b"]
    report["model"]["num_classes"] = 2
    assert clean_set_advice(report) is None
    assert clean_set_advice(fake_report()) is None  # a report from before the check
    # a softmax at the end: said whatever the accuracy, and beside the accuracy warning
    working = _with_clean_set(0.9, 0.3)
    working["clean_set"]["outputs_are_probabilities"] = True
    probs = clean_set_advice(working)
    assert probs is not None and probs.startswith("the model returns probabilities")
    assert "without its final softmax" in probs and "classifies" not in probs
    both = _with_clean_set(0.1, 0.9)
    both["clean_set"]["outputs_are_probabilities"] = True
    text = clean_set_advice(both)
    assert text is not None and "final softmax; and the original network classifies" in text
    write_report(_with_clean_set(0.1, 0.9), tmp_path)
    head = (tmp_path / "report.md").read_text().split("**MM-BD:")[0]
    assert "**Warning: the original network classifies 10.00%" in head


def test_ordinals_in_the_report() -> None:
    from calibrate.report import _ordinal

    got = [_ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 112)]
    assert got == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "112th",
    ]
    assert _ordinal(None) == "n/a"  # a report without the field
