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
    today = dataclasses.asdict(CalibrationConfig())
    _report(tmp_path, "current", today)
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
