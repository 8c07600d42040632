"""`mmguard calibrate`: a thin argparse front-end over `calibrate.pipeline.run_calibration`.

Parsing imports no torch; the pipeline is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from calibrate.config import (
    DEFAULT_NULL,
    DETECT_SCHEDULE,
    FALLBACK_NULL,
    RANGE_SCALES,
    REFERENCE_SCHEDULE,
    CalibrationConfig,
    ScheduleConfig,
    gpd_min_heldout,
)
from calibrate.errors import CalibrationError
from guard.mmdf import NULL_KINDS

SCHEDULES: dict[str, ScheduleConfig] = {
    "default": ScheduleConfig(),
    "detect": DETECT_SCHEDULE,
    "reference": REFERENCE_SCHEDULE,
}

_SCHEDULE_FLAGS: dict[str, type] = {
    "mm_source": str,
    "max_iters": int,
    "min_iters": int,
    "overtime_iters": int,
    "loss_rel_tol": float,
    "cold_ascent_steps": int,
    "warm_ascent_steps": int,
    "redraw_every": int,
    "ascent_optimizer": str,
    "ascent_lr": float,
    "bound_lr": float,
    "lambda_init": float,
    "mmom_lambda": float,
    "lambda_warmup": int,
    "lambda_every": int,
    "lambda_factor": float,
}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return parts[0], parts[1]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "calibrate",
        help="learn activation bounds, fit the MMDF null, run MM-BD, export a verified artifact",
        description="Calibrate an untrusted classifier on a small clean labelled set and write a "
        "deployable artifact (original.onnx, bounded.onnx, manifest.json) plus a report.",
    )
    src = p.add_argument_group("model (exactly one of --arch, --torchscript, --factory)")
    g = src.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", help="torchvision classification architecture, e.g. resnet18")
    g.add_argument("--torchscript", type=Path, help="a TorchScript file (torch.jit.save)")
    g.add_argument("--factory", help="package.module:callable returning an nn.Module")
    src.add_argument("--weights", type=Path, help="state_dict file for --arch or --factory")
    src.add_argument(
        "--weights-key",
        help="the entry of a checkpoint dict that holds the model's state_dict, where it holds "
        "several (found by itself otherwise)",
    )
    src.add_argument(
        "--mean", type=_floats, help="input normalisation mean, e.g. 0.485,0.456,0.406"
    )
    src.add_argument("--std", type=_floats, help="input normalisation std (with --mean)")
    data = p.add_argument_group("clean data")
    data.add_argument("--data", type=Path, required=True, help="ImageFolder dir or .npz file")
    data.add_argument("--min-per-class", type=int, default=10, help="fewest images per class")
    data.add_argument("--image-size", type=_size, help="resize images to N or HxW")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    out.add_argument("--name", help="model name the guard serves it under (default: --out name)")
    out.add_argument("--force", action="store_true", help="replace an existing --out")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    out.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    out.add_argument(
        "--device",
        default="auto",
        help="where the torch work runs: auto (the first CUDA GPU torch sees, else the CPU; "
        "the default), cpu, cuda or cuda:N; export runs on the CPU",
    )
    _add_method_flags(p)
    return p


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    d = CalibrationConfig()
    m = p.add_argument_group("method (defaults in SPEC.md; all recorded in the manifest)")
    m.add_argument("--objective", choices=["mmac", "mmom"], default=d.objective)
    m.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        default="default",
        help="preset: this project's fast schedule, detection first (one iteration: bounds "
        "near the clean maxima), or SPEC section 2's reference",
    )
    for name, kind in _SCHEDULE_FLAGS.items():
        m.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"schedule override (default schedule: {getattr(ScheduleConfig(), name)})",
        )
    m.add_argument(
        "--bound-lr-absolute",
        action="store_true",
        help="bound learning rate in activation units, not relative to each layer",
    )
    m.add_argument("--bound-init", default=d.bound_init, help="'max' or a positive constant")
    m.add_argument(
        "--bound-ceiling",
        choices=["max", "none"],
        default=d.bound_ceiling,
        help="max: no bound rises above its channel's maximum activation on the clean set",
    )
    m.add_argument("--target-agreement", type=float, default=d.target_agreement)
    m.add_argument(
        "--starts-per-class",
        type=int,
        default=d.starts_per_class,
        help="J ascent starts per class (0: clean learning images per class)",
    )
    m.add_argument(
        "--keep-misclassified",
        action="store_true",
        help="MMAC: keep clean images the model gets wrong (default: drop them)",
    )
    m.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    m.add_argument(
        "--null",
        choices=list(NULL_KINDS),
        default=d.null,
        help=f"the learned statistic's null (default: {DEFAULT_NULL} where the held-out images "
        f"carry it, {gpd_min_heldout()} or more, else {FALLBACK_NULL})",
    )
    m.add_argument(
        "--start-detector",
        action="store_true",
        help="MMAC: also export the bounds of the first iteration as a second detector (a "
        "third network per request; flags when either p-value < alpha/2)",
    )
    m.add_argument(
        "--start-null",
        choices=list(NULL_KINDS),
        default=d.start_null,
        help="the start detector's null (default: %(default)s)",
    )
    m.add_argument(
        "--range-detector",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also test how far the original network's activations leave their clean range (a "
        "second output of original.onnx: no extra network per request). Default: on when the "
        "clean images can carry its null (with --range-null gpd, 50 in each half's fit: the "
        "learning images and half the held-out ones), else off",
    )
    m.add_argument(
        "--range-null",
        choices=list(NULL_KINDS),
        default=d.range_null,
        help="the range detector's null (default: %(default)s)",
    )
    m.add_argument(
        "--range-scales",
        choices=list(RANGE_SCALES),
        default=d.range_scales,
        help="the range detector measures an input's activations against the clean scales of "
        "all clean images (global), of those of the class the network predicts for it (class), "
        "or against both, the larger ratio counting (default: %(default)s)",
    )
    m.add_argument("--alpha", type=float, default=d.alpha, help="flag when p < alpha")
    m.add_argument("--flag-on-disagreement", action="store_true")
    m.add_argument("--mmbd-starts", type=int, default=d.mmbd_starts)
    m.add_argument("--mmbd-steps", type=int, default=d.mmbd_steps)
    m.add_argument("--batch-size", type=int, default=d.batch_size)
    m.add_argument("--seed", type=int, default=d.seed)


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    if args.schedule == "detect" and args.objective != "mmac":
        raise CalibrationError("--schedule detect is for --objective mmac: MMOM needs learning")
    schedule = SCHEDULES[args.schedule]
    overrides: dict[str, Any] = {
        k: getattr(args, k) for k in _SCHEDULE_FLAGS if getattr(args, k) is not None
    }
    if args.bound_lr_absolute:
        overrides["bound_lr_relative"] = False
    schedule = dataclasses.replace(schedule, **overrides)
    if args.start_detector and schedule.max_iters + schedule.overtime_iters <= 1:
        raise CalibrationError(
            "--start-detector needs more than one MMAC iteration: with one, the start and the "
            "learned bounds are the same (drop --start-detector or raise --max-iters)"
        )
    return CalibrationConfig(
        objective=args.objective,
        schedule=schedule,
        bound_init=args.bound_init,
        bound_ceiling=args.bound_ceiling,
        target_agreement=args.target_agreement,
        starts_per_class=args.starts_per_class,
        correct_only=not args.keep_misclassified,
        heldout_fraction=args.heldout_fraction,
        null=args.null,
        start_detector=args.start_detector,
        start_null=args.start_null,
        range_detector=args.range_detector,
        range_null=args.range_null,
        range_scales=args.range_scales,
        alpha=args.alpha,
        flag_on_disagreement=args.flag_on_disagreement,
        mmbd_starts=args.mmbd_starts,
        mmbd_steps=args.mmbd_steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def set_up_torch_threads(threads: int) -> None:
    """Threads for a calibrate or demo command's torch work: ``threads`` (0 keeps torch's default,
    one per core), and OpenMP threads that sleep while they wait.

    By default torch's OpenMP threads spin for a while before they sleep. On a machine where
    another process holds a core, a spinning thread takes time the thread doing the work needs:
    with one other busy process on 2 cores, ``benchmarks/contention.py`` measured a shortened
    demo calibration 1.49 times slower with OpenMP's default than with PASSIVE, and 0.97 times
    on an idle machine. So unless the user has set ``OMP_WAIT_POLICY``, it is set to PASSIVE
    here. OpenMP reads it once, when torch is first imported; if torch is already imported it is
    left alone (and a user's GOMP_SPINCOUNT overrides either).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """Returns the exit status; bad input is one line on stderr and status 2."""
    try:
        cfg = config_from_args(args)
        set_up_torch_threads(args.threads)  # before torch is imported
        from calibrate.modelsrc import ModelSource
        from calibrate.pipeline import CalibrationJob, run_calibration

        job = CalibrationJob(
            model=ModelSource(
                arch=args.arch,
                weights=args.weights,
                torchscript=args.torchscript,
                factory=args.factory,
                weights_key=args.weights_key,
            ),
            data=args.data,
            out=args.out,
            name=args.name or args.out.resolve().name,
            mean=args.mean,
            std=args.std,
            min_per_class=args.min_per_class,
            image_size=args.image_size,
            config=cfg,
            force=args.force,
            quiet=args.quiet,
            device=args.device,
        )
        outcome = run_calibration(job)
    except CalibrationError as exc:
        print(f"mmguard calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(summary(outcome.report, outcome.out))
    return 0


def _fpr_upper(heldout: dict[str, Any]) -> str:
    """The summary's note of how high the false-positive rate could be (reports from before it
    have none)."""
    upper = heldout.get("false_positive_rate_upper95")
    if upper is None:
        return ""
    return f" (at most {upper:.2%} at 95% confidence, from {heldout['n']} held-out images)"


def summary(report: dict[str, Any], out: Path) -> str:
    h, mmbd = report["heldout"], report["mmbd"]
    names = report["model"]["class_names"]
    verdict = (
        f"backdoor suspected, target class {names[mmbd['target']]} (p = {mmbd['p_value']:.3g})"
        if mmbd["suspected"]
        else f"no backdoor detected (p = {mmbd['p_value']:.3g})"
    )
    from calibrate.report import clean_set_advice, null_fit_advice

    advice = null_fit_advice(report)
    warning = clean_set_advice(report)
    kept = report.get("bounds_from_iteration")
    fallback = (
        f"  note: the bounded network was still below the agreement target after "
        f"{report['iterations']} iterations; these are the bounds of iteration {kept}, the last "
        "that met it (more --overtime-iters or a smaller --lambda-init let a run finish on it)"
    )
    on = f" on {report['device']}" if report.get("device") else ""
    return "\n".join(
        [
            f"wrote {out} ({report['iterations']} iterations, "
            f"{report['timing_s']['total']:.1f} s{on})",
            f"  MM-BD: {verdict}",
            f"  held-out clean: accuracy {h['accuracy_original']:.2%} original, "
            f"{h['accuracy_guarded']:.2%} guarded; bounded agrees on {h['agreement']:.2%}; "
            f"false-positive rate {h['false_positive_rate']:.2%} "
            f"at alpha {report['null']['alpha']}{_fpr_upper(h)}",
            *([f"  warning: {warning}"] if warning else []),
            *([f"  note: {advice}"] if advice else []),
            *([fallback] if kept is not None else []),
            *([f"  null {report['null']['chosen']}"] if "chosen" in report["null"] else []),
            *(
                [f"  range detector {report['range_detector_off']}"]
                if "range_detector_off" in report
                else []
            ),
            f"  report: {out / 'report.md'}",
        ]
    )
