"""`mmguard calibrate` in this process on a benchmark's CIFAR ResNet-18, as the benchmarks run it:
the command's own argument parser and defaults, quiet, replacing any earlier output."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FACTORY = "benchmarks.cifar:cifar_resnet18"


def factory_for(width: int, arch: str | None = None) -> str:
    """The ``--factory`` that builds the benchmark network of ``width`` (ResNet-18, or
    ``arch``)."""
    from benchmarks.cifar import ARCH_FACTORIES, FACTORIES

    if arch is not None and arch != "resnet18":
        if (arch, width) not in ARCH_FACTORIES:
            raise ValueError(f"no factory for {arch} at width {width}: {sorted(ARCH_FACTORIES)}")
        return ARCH_FACTORIES[(arch, width)]
    if width not in FACTORIES:
        raise ValueError(f"no factory for width {width}: one of {sorted(FACTORIES)}")
    return FACTORIES[width]


def calibration_args(flags: Sequence[str] = ()) -> Any:
    """``mmguard calibrate FLAGS`` parsed by the command's own parser (with placeholder model,
    data and output paths, which the callers replace)."""
    from guard.cli import build_parser

    argv = ["calibrate", "--factory", FACTORY, "--weights", "-", "--data", "-", "--out", "-"]
    return build_parser().parse_args([*argv, *flags])


def calibration_config(flags: Sequence[str] = ()) -> Any:
    """The configuration ``mmguard calibrate FLAGS`` runs with (the model, data and output
    paths it requires do not enter the configuration)."""
    from calibrate.cli import config_from_args

    return config_from_args(calibration_args(flags))


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
    from calibrate.cli import config_from_args
    from calibrate.modelsrc import ModelSource
    from calibrate.pipeline import CalibrationJob, run_calibration

    args = calibration_args(flags)
    cfg = config_from_args(args)
    job = CalibrationJob(
        model=ModelSource(factory=factory, weights=weights),
        data=data_npz,
        out=out,
        name=name,
        config=cfg,
        force=True,
        quiet=True,
        observer=observer,
        device=args.device,  # `--device` among the flags; auto by default, as the command
    )
    t = time.perf_counter()
    result = run_calibration(job)
    return result, cfg, time.perf_counter() - t
