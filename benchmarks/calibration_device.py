"""Calibration on the CPU and on a CUDA GPU, side by side in one run: `mmguard calibrate
--device` on the same model, clean images and seed, each device in turn.

Prints each device's wall time and the ratio to the first device's, and what should not depend
on the device: the iterations run, MM-BD's verdict, the held-out figures. The learned bounds
are compared too; they are not equal (the GPU's floating point is not the CPU's, and the runs
drift apart a little). Defaults to the embedded demo model (a BadNets CIFAR-10 ResNet-18 of
width 16) with `mmguard calibrate`'s defaults (MM-BD 300 steps).

    python -m benchmarks.calibration_device                  # cpu, then cuda
    python -m benchmarks.calibration_device --devices cuda --factory F --weights W --data D

A device torch cannot use stops the run with `mmguard calibrate`'s one-line error.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.calibrating import calibrate_cifar

EXAMPLE = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "cifar10"


def calibrate_on(
    device: str, factory: str, weights: Path, data: Path, out: Path, flags: list[str]
) -> tuple[dict[str, Any], float]:
    """One `mmguard calibrate` run on `device` (the benchmarks' `calibrate_cifar`, with
    `--device` last among the flags); its report and wall seconds."""
    outcome, _, seconds = calibrate_cifar(
        weights, data, out, out.name, [*flags, "--device", device], factory
    )
    return outcome.report, seconds


def bound_agreement(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Over every learned bound of two reports: the share within 5% of each other (1e-3
    absolute near 0), and the median relative difference."""
    va = np.concatenate([np.asarray(layer["values"]) for layer in a["bounds"]])
    vb = np.concatenate([np.asarray(layer["values"]) for layer in b["bounds"]])
    close = float(np.mean(np.isclose(va, vb, rtol=0.05, atol=1e-3)))
    rel = np.abs(va - vb) / np.maximum(np.abs(vb), 1e-3)
    return close, float(np.median(rel))


def row(device: str, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    h, mmbd = report["heldout"], report["mmbd"]
    return {
        "device": report["device"],
        "seconds": round(seconds, 1),
        "timing_s": {k: round(v, 1) for k, v in report["timing_s"].items()},
        "iterations": report["iterations"],
        "mmbd_target": mmbd["target"],
        "mmbd_p": mmbd["p_value"],
        "heldout_fpr": h["false_positive_rate"],
        "heldout_agreement": h["agreement"],
        "heldout_accuracy_guarded": h["accuracy_guarded"],
        "requested": device,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated, in run order")
    parser.add_argument("--factory", default=None, help="default: the embedded demo model's")
    parser.add_argument("--weights", type=Path, default=EXAMPLE / "model.pt")
    parser.add_argument("--data", type=Path, default=EXAMPLE / "clean.npz")
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument(
        "--calibrate-args", default="", help="extra mmguard calibrate flags, as one argument"
    )
    args = parser.parse_args(argv)
    factory = args.factory or json.loads((EXAMPLE / "example.json").read_text())["factory"]
    flags = shlex.split(args.calibrate_args)
    from calibrate.errors import CalibrationError

    rows, reports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
            try:
                report, seconds = calibrate_on(
                    device, factory, args.weights, args.data, base / device.replace(":", "_"), flags
                )
            except CalibrationError as exc:
                print(f"calibration_device: error: {exc}", file=sys.stderr)
                return 2
            rows.append(row(device, report, seconds))
            reports.append(report)
            print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    for r, rep in zip(rows[1:], reports[1:], strict=True):
        r["speedup_vs_first"] = round(first["seconds"] / r["seconds"], 2)
        r["bounds_within_5pct_vs_first"], r["median_rel_bound_difference_vs_first"] = (
            bound_agreement(rep, reports[0])
        )
        print(
            f"{r['device']}: {r['seconds']:.1f} s against {first['device']}'s "
            f"{first['seconds']:.1f} s, {r['speedup_vs_first']:.2f}x faster; iterations "
            f"{r['iterations']} / {first['iterations']}; MM-BD class {r['mmbd_target']} "
            f"(p {r['mmbd_p']:.3g}) / {first['mmbd_target']} (p {first['mmbd_p']:.3g}); "
            f"held-out FPR {r['heldout_fpr']:.2%} / {first['heldout_fpr']:.2%}; bounds within "
            f"5%: {r['bounds_within_5pct_vs_first']:.1%}, median relative difference "
            f"{r['median_rel_bound_difference_vs_first']:.2e}",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
