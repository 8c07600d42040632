"""`mmguard calibrate` in this process on a benchmark's CIFAR ResNet-18, as the benchmarks run it:
the command's own argument parser and defaults, quiet, replacing any earlier output."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FACTORY = "benchmarks.cifar:cifar_resnet18"


def factory_for(width: int) -> str:
    """The ``--factory`` that builds the benchmark ResNet-18 of ``width``."""
    from benchmarks.cifar import FACTORIES

    if width not in FACTORIES:
        raise ValueError(f"no factory for width {width}: one of {sorted(FACTORIES)}")
    return FACTORIES[width]


def calibration_config(flags: Sequence[str] = ()) -> Any:
    """The configuration ``mmguard calibrate FLAGS`` runs with, parsed by the command's own
    parser (the model, data and output paths it requires do not enter the configuration)."""
    from calibrate.cli import config_from_args
    from guard.cli import build_parser

    argv = ["calibrate", "--factory", FACTORY, "--weights", "-", "--data", "-", "--out", "-"]
    return config_from_args(build_parser().parse_args([*argv, *flags]))


def calibrate_cifar(
    weights: Path,
    data_npz: Path,
    out: Path,
    name: str,
    flags: Sequence[str] = (),
    factory: str = FACTORY,
    observer: Any = None,
) -> tuple[Any, Any, float]:
    """``mmguard calibrate --factory F --weights W --data D --out O FLAGS``; returns the
    pipeline's result, the configuration it ran with, and the wall seconds. ``observer``: the
    job's per-iteration diagnostics hook (``CalibrationJob.observer``)."""
    from calibrate.modelsrc import ModelSource
    from calibrate.pipeline import CalibrationJob, run_calibration

    cfg = calibration_config(flags)
    job = CalibrationJob(
        model=ModelSource(factory=factory, weights=weights),
        data=data_npz,
        out=out,
        name=name,
        config=cfg,
        force=True,
        quiet=True,
        observer=observer,
    )
    t = time.perf_counter()
    result = run_calibration(job)
    return result, cfg, time.perf_counter() - t
