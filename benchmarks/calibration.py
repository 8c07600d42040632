"""Calibration benchmark on real CIFAR-10: the default schedule against SPEC section 2's reference.

Trains (or reuses) a BadNets-backdoored CIFAR ResNet-18 of reduced width, draws a clean balanced
calibration set of 50 images per class from the test split, calibrates twice in one run, (a) with
this project's default schedule and (b) with the reference schedule, and scores each exported
artifact in onnxruntime on the rest of the test split: clean accuracy, attack success rate and
clean false-positive rate under MMDF. Prints wall times and the ratio (b)/(a).

Run from the repository root: ``.venv/bin/python -m benchmarks.calibration``.
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting keeps a shared 2-core CPU from thrashing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.calibrating import calibrate_cifar
from benchmarks.cifar import DEFAULT_EPOCHS, DEFAULT_WIDTH, apply_badnets, get_or_train_badnets
from benchmarks.cifar import load_cifar10 as load_cifar

REPO_ROOT = Path(__file__).resolve().parents[1]


def calibration_split(
    data: dict[str, np.ndarray], per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the test split: a balanced clean calibration set and the evaluation rest."""
    rng = np.random.default_rng(seed)
    y = data["y_test"]
    picked = np.concatenate(
        [rng.choice(np.flatnonzero(y == k), per_class, replace=False) for k in np.unique(y)]
    )
    rest = np.setdiff1d(np.arange(y.size), picked)
    return np.sort(picked), rest


def to_float(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_uint8_nhwc.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def score(artifact_dir: Path, x: np.ndarray, y: np.ndarray, target: int) -> dict[str, float]:
    """Undefended and guarded figures from the exported ONNX files and the manifest alone."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine
    from guard.mmdf import DecisionRule, decide

    art = load_artifact(artifact_dir)
    engine = GuardEngine(art, "cpu")
    clean_g, clean_gz = _batched_logits(engine, to_float(x))
    trig = y != target
    bad_g, bad_gz = _batched_logits(engine, to_float(apply_badnets(x[trig])))
    out: dict[str, float] = {
        "undefended_clean_accuracy": float(np.mean(clean_g.argmax(1) == y)),
        "undefended_asr": float(np.mean(bad_g.argmax(1) == target)),
    }
    for tag, disagreement in (("", False), ("_with_disagreement", True)):
        rule = DecisionRule(art.rule.alpha, flag_on_disagreement=disagreement)
        clean = decide(clean_g, clean_gz, art.null, rule)
        bad = decide(bad_g, bad_gz, art.null, rule)
        out[f"clean_accuracy{tag}"] = float(np.mean(clean.label == y))
        out[f"asr{tag}"] = float(np.mean(bad.label == target))
        out[f"fpr{tag}"] = float(np.mean(clean.flagged))
        out[f"detection_rate{tag}"] = float(np.mean(bad.flagged))
    out["provider"] = engine.providers[0]  # type: ignore[assignment]
    return out


def _batched_logits(engine: Any, x: np.ndarray, bs: int = 500) -> tuple[np.ndarray, np.ndarray]:
    parts = [engine.logits(x[i : i + bs]) for i in range(0, x.shape[0], bs)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def calibrate_once(
    label: str,
    schedule: str,
    weights: Path,
    data_npz: Path,
    out: Path,
    threads: int,
    extra: list[str],
) -> dict[str, Any]:
    flags = ["--schedule", schedule, *extra]
    if schedule == "reference":  # SPEC 5: MM-BD ascent up to 300 steps, as in the reference
        flags += ["--mmbd-steps", "300"]
    print(f"[{label}] calibrating with the {schedule} schedule ...", file=sys.stderr, flush=True)
    result, cfg, wall = calibrate_cifar(weights, data_npz, out, f"cifar10-badnets-{label}", flags)
    report = result.report
    return {
        "wall_s": wall,
        "learn_bounds_s": report["timing_s"]["learn_bounds"],
        "mmbd_s": report["timing_s"]["mmbd"],
        "mmbd_steps": cfg.mmbd_steps,
        "iterations": report["iterations"],
        "final_lambda": report["final_lambda"],
        "mmbd": report["mmbd"],
        "heldout": report["heldout"],
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--per-class", type=int, default=50, help="clean calibration images per class")
    p.add_argument("--only", choices=["a", "b", "both"], default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--a-args", default="", help="extra `mmguard calibrate` flags for run (a), quoted"
    )
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model, model_metrics = get_or_train_badnets(
        args.data, args.cache_dir, width=args.width, epochs=args.epochs
    )
    del model
    target = int(model_metrics["target"])
    weights = args.cache_dir / (
        f"badnets_resnet18_w{args.width}_e{args.epochs}_s{model_metrics['seed']}.pt"
    )
    data = load_cifar(args.data, args.cache_dir)
    calib_idx, eval_idx = calibration_split(data, args.per_class, seed=1)
    data_npz = args.cache_dir / f"calib_{args.per_class}pc.npz"
    np.savez(
        data_npz,
        images=data["x_test"][calib_idx],
        labels=data["y_test"][calib_idx],
        class_names=data["class_names"],
    )
    x_eval, y_eval = data["x_test"][eval_idx], data["y_test"][eval_idx]

    runs = {"a": "default", "b": "reference"}
    if args.only != "both":
        runs = {args.only: runs[args.only]}
    results: dict[str, Any] = {"model": model_metrics, "eval_images": int(y_eval.size)}
    for label, schedule in runs.items():
        out = args.cache_dir / f"artifact_{label}"
        extra = args.a_args.split() if label == "a" else []
        res = calibrate_once(label, schedule, weights, data_npz, out, args.threads, extra)
        res["extra_args"] = extra
        res.update(score(out, x_eval, y_eval, target))
        results[label] = res
        print(f"[{label}] {json.dumps(res)}", file=sys.stderr, flush=True)
    (args.cache_dir / "calibration_results.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    m = results["model"]
    lines = [
        f"model: CIFAR ResNet-18 width {m['width']} ({m['epochs']} epochs), BadNets 3x3 patch, "
        f"target {m['target']}, poison rate {m['poison_rate']}",
        f"undefended (full test split): clean accuracy {m['clean_accuracy']:.2%}, "
        f"ASR {m['attack_success_rate']:.2%}",
        f"evaluation images (test split minus the calibration set): {results['eval_images']}",
        "",
        f"{'run':<14}{'wall s':>9}{'bounds s':>10}{'iters':>7}{'clean acc':>11}{'ASR':>9}"
        f"{'FPR':>8}{'FPR+dis':>9}{'ASR+dis':>9}",
    ]
    for label, name in (("a", "a default"), ("b", "b reference")):
        if label in results:
            r = results[label]
            lines.append(
                f"{name:<14}{r['wall_s']:>9.1f}{r['learn_bounds_s']:>10.1f}{r['iterations']:>7}"
                f"{r['clean_accuracy']:>11.2%}{r['asr']:>9.2%}{r['fpr']:>8.2%}"
                f"{r['fpr_with_disagreement']:>9.2%}{r['asr_with_disagreement']:>9.2%}"
            )
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        lines += [
            "",
            f"ratio (b)/(a) wall time: {b['wall_s'] / a['wall_s']:.2f}x; "
            f"bound learning alone: {b['learn_bounds_s'] / a['learn_bounds_s']:.2f}x",
            f"(a) - (b): ASR {100 * (a['asr'] - b['asr']):+.2f} points, clean accuracy "
            f"{100 * (a['clean_accuracy'] - b['clean_accuracy']):+.2f} points",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
