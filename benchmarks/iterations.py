"""How well the bounds detect a trigger at every iteration of one calibration, next to the
figures the schedule itself sees (clean agreement, lambda, the margin term).

Run from the repository root::

    .venv/bin/python -m benchmarks.iterations wanet_e40
    .venv/bin/python -m benchmarks.iterations wanet_e40 --variant ceiling80 \\
        --calibrate-args '--bound-ceiling max --min-iters 80'

It runs ``mmguard calibrate`` on the model as ``benchmarks.evaluate`` does (same calibration
images, defaults plus ``--calibrate-args``) and, after every ``--every``-th bound-learning
iteration, scores the bounds of that moment on ``--n-eval`` images drawn from the evaluation
split (seeded), clean and with the model's trigger: AUROC of the MMDF statistic and its TPR at
a matched 0.5% clean flag rate (the oracle threshold of ``benchmarks.evaluate``). The run's
calibration output goes to a scratch folder; the series goes to
``CACHE/eval/NAME/iterations[-V].json`` and a figure to ``docs/figures/NAME-iterations[-V].png``.

A diagnostic: the defender has no triggered images, so nothing here can steer a calibration.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.attacks import ATTACKS
from benchmarks.calibrating import calibrate_cifar, calibration_config, factory_for
from benchmarks.evalmetrics import tpr_at_fpr
from benchmarks.evaluate import EVAL_ATTACK, REPO_ROOT, split_test, to_float
from benchmarks.train_models import model_paths, parse_name
from calibrate.cifar_resnet import DEFAULT_WIDTH
from calibrate.scoring import auroc

MATCHED_FPR = 0.005  # the guard's default alpha, as in benchmarks.evaluate


def detection(d_clean: np.ndarray, d_triggered: np.ndarray) -> dict[str, float]:
    tpr, fpr = tpr_at_fpr(d_clean, d_triggered, MATCHED_FPR)
    return {"auroc": auroc(d_clean, d_triggered), "tpr_matched": tpr, "fpr_matched": fpr}


def series(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from benchmarks.cifar import load_cifar10
    from calibrate.mitigate import batched_logits
    from guard.mmdf import statistic

    data = load_cifar10(args.data, args.cache_dir)
    _, _, evaluation = split_test(data["y_test"])
    weights, record = model_paths(args.cache_dir, name)
    if not weights.exists():
        raise SystemExit(f"{name}: no trained model at {weights}")
    width = int(json.loads(record.read_text()).get("width", DEFAULT_WIDTH))
    attack = ATTACKS.get(parse_name(name)[0], ATTACKS[EVAL_ATTACK])
    # a seeded draw: the test split is stored in class order, so a prefix would be one class
    n = min(args.n_eval, evaluation.size)
    idx = np.sort(np.random.default_rng(0).choice(evaluation, n, replace=False))
    x, y = data["x_test"][idx], data["y_test"][idx]
    clean = torch.from_numpy(to_float(x))
    triggered = torch.from_numpy(to_float(attack.trigger(x[attack.eval_mask(y)])))
    calib_npz = args.cache_dir / "eval" / "calib.npz"
    if not calib_npz.exists():
        raise SystemExit(f"{calib_npz} is missing: run benchmarks.evaluate once first")
    with np.load(calib_npz) as z:
        calib = torch.from_numpy(to_float(z["images"]))
    # the observer runs the networks on these CPU tensors: the calibration stays on the CPU
    flags = [*shlex.split(args.calibrate_args), "--device", "cpu"]
    cfg = calibration_config(flags)
    inputs = {"clean": clean, "triggered": triggered, "calib": calib}
    reference: dict[str, np.ndarray] = {}
    maxima: list[Any] = []  # MM-BD's maxima: their original logits, the points
    rows: list[dict[str, Any]] = []

    def observe(it: int, row: dict[str, float], net: Any, original: Any) -> None:
        if it % args.every:
            return
        if not reference:
            with torch.no_grad():
                reference.update(
                    {k: batched_logits(original, v, 256).numpy() for k, v in inputs.items()}
                )
            maxima.extend(_mmbd_maxima(original, cfg, reference["calib"].shape[1]))
        with torch.no_grad():
            d = {
                k: statistic(reference[k], batched_logits(net, v, 256).numpy())
                for k, v in inputs.items()
            }
            d_max = statistic(maxima[0], net(maxima[1]).numpy())
        out = {"iter": it, **{k: float(v) for k, v in row.items() if k != "iter"}}
        out.update(detection(d["clean"], d["triggered"]))
        # what the defender could see: the calibration images against MM-BD's maxima
        proxy = detection(d["calib"], d_max)
        out.update({"maxima_auroc": proxy["auroc"], "maxima_tpr_matched": proxy["tpr_matched"]})
        rows.append(out)
        print(json.dumps({k: round(v, 4) for k, v in out.items()}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        calibrate_cifar(
            weights, calib_npz, Path(tmp) / "artifact", name, flags, factory_for(width), observe
        )
    return rows


def _mmbd_maxima(original: Any, cfg: Any, k: int) -> tuple[np.ndarray, Any]:
    """MM-BD's maxima on the original network, from the calibration's seed with mmbd_starts
    starts per class: the calibration's own points when its J (the learning images per class)
    is at most mmbd_starts, as on the benchmark calibration set (30 and 30); CIFAR-10 images.
    Returns their original logits and the points."""
    import torch

    from calibrate.pipeline import original_maxima

    _, (x, _) = original_maxima(original, k, cfg.mmbd_starts, (3, 32, 32), cfg, quiet=True)
    with torch.no_grad():
        return original(x).numpy(), x


def figure(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iter"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(it, [r["auroc"] for r in rows], label="AUROC")
    ax1.plot(it, [r["tpr_matched"] for r in rows], label=f"TPR at {MATCHED_FPR:.1%} clean FPR")
    ax1.set(ylim=(0, 1.02), title=title, ylabel="detection")
    ax1.legend(fontsize=8)
    ax2.plot(it, [r["agreement"] for r in rows], label="clean agreement", color="C2")
    ax2.set(xlabel="bound-learning iteration", ylabel="agreement")
    twin = ax2.twinx()
    twin.plot(it, [r["lambda"] for r in rows], label="lambda", color="C3")
    twin.set_ylabel("lambda")
    ax2.legend(loc="lower left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a model of benchmarks.train_models, e.g. wanet_e40")
    parser.add_argument("--variant", default="", help="a label for the output files")
    parser.add_argument("--calibrate-args", default="", help="extra mmguard calibrate flags")
    parser.add_argument("--every", type=int, default=2, help="score every N-th iteration")
    parser.add_argument("--n-eval", type=int, default=3000, help="evaluation images scored")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    parser.add_argument("--fig-dir", type=Path, default=REPO_ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    if args.every < 1 or args.n_eval < 1:
        parser.error("--every and --n-eval must be >= 1")
    rows = series(args.name, args)
    suffix = f"-{args.variant}" if args.variant else ""
    out = args.cache_dir / "eval" / args.name / f"iterations{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"name": args.name, "calibrate_args": args.calibrate_args, "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    title = f"{args.name}{suffix}: detection by iteration"
    figure(rows, title, args.fig_dir / f"{args.name}-iterations{suffix}.png")
    print(f"{len(rows)} iterations scored: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
