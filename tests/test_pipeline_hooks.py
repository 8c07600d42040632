"""The calibration pipeline's diagnostics hook and the bound ceiling, end to end on the tiny
example (a few iterations, so each run takes seconds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from calibrate.config import CalibrationConfig, ScheduleConfig
from calibrate.modelsrc import ModelSource
from calibrate.pipeline import CalibrationJob, run_calibration
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"
SHORT = ("--mmbd-steps", "10", "--max-iters", "6", "--min-iters", "6", "--overtime-iters", "0")


def test_the_observer_sees_every_iteration_and_the_bounds_it_left(tmp_path: Path) -> None:
    seen: list[tuple[int, float, list[torch.Tensor]]] = []

    def observe(it: int, row: dict[str, float], net: Any, original: Any) -> None:
        assert net is not original
        seen.append((it, row["agreement"], [b.detach().clone() for b in net.bounds()]))

    schedule = ScheduleConfig(max_iters=6, min_iters=6, overtime_iters=0)
    cfg = dataclasses.replace(CalibrationConfig(), schedule=schedule, mmbd_steps=10)
    job = CalibrationJob(
        model=ModelSource(factory="calibrate.synthetic:small_cnn", weights=TINY / "model.pt"),
        data=TINY / "clean.npz",
        out=tmp_path / "art",
        name="tiny",
        config=cfg,
        quiet=True,
        observer=observe,
    )
    outcome = run_calibration(job)
    assert [it for it, _, _ in seen] == list(range(1, outcome.report["iterations"] + 1))
    assert [a for _, a, _ in seen] == [row["agreement"] for row in outcome.report["history"]]
    # the bounds move, and the last ones seen are those the report records
    first, last = seen[0][2], seen[-1][2]
    assert any(not torch.equal(a, b) for a, b in zip(first, last, strict=True))
    if outcome.report["bounds_from_iteration"] is None:
        for layer, bound in zip(outcome.report["bounds"], last, strict=True):
            assert layer["values"] == pytest.approx(bound.tolist())


@pytest.mark.parametrize("ceiling", ["max", "none"])
def test_bound_ceiling_flag(tmp_path: Path, ceiling: str) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(
        ["calibrate", "--factory", "calibrate.synthetic:small_cnn",
         "--weights", str(TINY / "model.pt"), "--data", str(TINY / "clean.npz"),
         "--out", str(out), "--quiet", "--bound-ceiling", ceiling, *SHORT]
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["bound_ceiling"] == ceiling
    if ceiling == "max":  # bound_init=max: the ceiling is each bound's starting value
        for layer in report["bounds"]:
            assert layer["final_max"] <= layer["init_max"] + 1e-6
