"""benchmarks.evaluate's marking of artifacts calibrated with earlier defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks.evaluate import _earlier_defaults
from calibrate.config import CalibrationConfig


def _report(cache: Path, name: str, config: dict) -> None:
    art = cache / "eval" / name / "artifact"
    art.mkdir(parents=True)
    (art / "report.json").write_text(json.dumps({"config": config}))


def test_earlier_defaults_names_what_differs_from_today(tmp_path: Path) -> None:
    # as a calibration records it, the range detector decided: on for 200 held-out images
    today = dataclasses.asdict(CalibrationConfig().resolve(200))
    _report(tmp_path, "current", today)
    _report(tmp_path, "no_range", {**today, "range_detector": False})
    before_range = {k: v for k, v in today.items() if k not in ("range_detector", "range_null")}
    _report(tmp_path, "before_range", before_range)
    _report(tmp_path, "old_steps", {**today, "mmbd_steps": 100})
    before_ceiling = {k: v for k, v in today.items() if k != "bound_ceiling"}
    _report(tmp_path, "before_ceiling", {**before_ceiling, "mmbd_steps": 100})
    _report(tmp_path, "with_ceiling", {**today, "bound_ceiling": "max"})
    assert _earlier_defaults(tmp_path, "current") == []
    assert _earlier_defaults(tmp_path, "old_steps") == ["MM-BD ascent of 100 steps"]
    # a report from before the option existed was calibrated without a ceiling: today's default
    assert _earlier_defaults(tmp_path, "before_ceiling") == ["MM-BD ascent of 100 steps"]
    assert _earlier_defaults(tmp_path, "with_ceiling") == ["bound ceiling max"]
    assert _earlier_defaults(tmp_path, "missing") == []
    assert _earlier_defaults(tmp_path, "no_range") == ["no range detector"]
    assert _earlier_defaults(tmp_path, "before_range") == ["no range detector"]


def test_guard_figures_count_the_range_detectors_flags() -> None:
    """benchmarks.evaluate scores an artifact's range detector with guard.mmdf.decide: a
    triggered input the learned bounds miss but whose activations leave their clean range is
    flagged and corrected; a clean one in range is not."""
    import numpy as np

    from benchmarks.evaluate import extra_detectors, guard_figures
    from guard.mmdf import Null

    g = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=np.float32)  # classes 0 and 1
    gz = g + np.array([0.0, 0.0, 0.5], dtype=np.float32)  # d = 0; best other class 2
    null, range_null = Null("gaussian", 0.0, 1.0), Null("gaussian", 1.0, 0.1)
    y = np.array([0, 1])
    clean_ratios = np.array([[0.9, 1.0], [0.8, 0.7]], dtype=np.float32)
    trig_ratios = np.array([[0.9, 4.0], [0.8, 1.1]], dtype=np.float32)  # input 0 out of range
    ty, attacker = np.array([2, 2]), np.array([0, 1])  # the attack sent both to their class
    extras = extra_detectors(None, (range_null, clean_ratios, trig_ratios))
    with_range = guard_figures(g, gz, y, g, gz, ty, attacker, null, 0.005, extras)["p"]
    without = guard_figures(g, gz, y, g, gz, ty, attacker, null, 0.005)["p"]
    assert without == {"clean_accuracy": 1.0, "fpr": 0.0, "asr": 1.0, "restored": 0.0, "tpr": 0.0}
    assert with_range == {
        "clean_accuracy": 1.0, "fpr": 0.0, "asr": 0.5, "restored": 0.5, "tpr": 0.5
    }  # fmt: skip
    assert extra_detectors() is None
