"""The range detector beside an artifact's learned bounds, without recalibrating: for a scored
model whose `--range-detector` calibration would take too long here (a full-width network:
about 40 minutes on this CPU, half of it MM-BD).

The learned bounds of `mmguard calibrate --range-detector` are a plain calibration's (its
`bounded.onnx` has the same sha256; tests/test_range_detector.py), so only the range detector's
own parts are computed here, with the calibration pipeline's functions: the same learning
and held-out images (the split, the seed), the per-channel maxima in the original network over
those it classifies correctly, the ratios in torch and the null fitted on the same images.
The guard's decision code then combines it with the artifact's null, as `mmguard serve`
would. Results: `.cache/bench/eval/NAME/range-offline-VARIANT.json`.

    python -m benchmarks.range_offline wanetbatch_w64_e90   # beside its default artifact
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluate import (
    REPO_ROOT,
    guard_figures,
    guard_logits,
    split_test,
    to_float,
    variant_problem,
)
from benchmarks.train_models import model_name, model_paths, parse_name


def range_parts(
    name: str, cache_dir: Path, art: Any, scales: str = "both"
) -> tuple[Any, Any, float | None]:
    """The range network, its fitted null and the balance of its class-conditional ratios (None
    without both kinds of scales), as `mmguard calibrate --range-detector --range-scales
    SCALES` builds them for this model and calibration set."""
    import torch

    from benchmarks.calibrating import factory_for
    from calibrate.bounded import BoundedNetwork
    from calibrate.cifar_resnet import DEFAULT_WIDTH
    from calibrate.config import CalibrationConfig
    from calibrate.dataset import load_clean_set, split_clean_set
    from calibrate.mitigate import batched_logits
    from calibrate.modelsrc import ModelSource, load_model
    from calibrate.pipeline import _learning_set, fit_range_detector

    # the artifact's own split (its --seed): the range detector is fitted on all the clean
    # images either way, but the learning images are checked against the artifact's
    seed = int(art.manifest["split"].get("seed", 0))
    cfg = CalibrationConfig(range_detector=True, range_scales=scales, seed=seed)
    weights = model_paths(cache_dir, name)[0]
    factory = factory_for(parse_name(name).width or DEFAULT_WIDTH)
    clean = load_clean_set(cache_dir / "eval" / "calib.npz")
    if list(clean.class_names) != list(art.class_names):
        raise SystemExit("the calibration set's classes are not the artifact's")
    model = load_model(ModelSource(factory=factory, weights=weights), len(clean.class_names))
    model.eval()
    learn, held = split_clean_set(clean, cfg.heldout_fraction, cfg.seed)
    split = art.manifest["split"]
    if (split["learn"], split["heldout"]) != (learn.labels.size, held.labels.size):
        raise SystemExit("the artifact was calibrated on another split")
    x_learn = torch.from_numpy(learn.images)
    x_d, _, _ = _learning_set(cfg, learn, batched_logits(model, x_learn, cfg.batch_size))
    if x_d.shape[0] != split["learn_used"]:
        raise SystemExit("the learning images differ from the artifact's")
    net = BoundedNetwork(model, x_d[:2])
    ranged = fit_range_detector(net, learn, held, cfg)
    return ranged.network, ranged.null, ranged.balance


def run(
    name: str,
    variant: str,
    cache_dir: Path,
    data: dict[str, np.ndarray],
    scales: list[str],
    artifact: Path | None = None,
) -> list[dict]:
    """Per entry of `scales`, the range detector fitted that way beside the artifact's learned
    bounds (`artifact`, default the scored artifact of `variant`), each scored on the same
    guard logits; one results file per scales, named after `variant`."""
    art_dir = artifact or (
        cache_dir / "eval" / name / ("artifact" if not variant else f"artifact-{variant}")
    )
    s = guard_logits(name, art_dir, data, split_test(data["y_test"]))
    return [score(name, variant, cache_dir, art_dir, s, how) for how in scales]


def score(name: str, variant: str, cache_dir: Path, art_dir: Path, s: Any, scales: str) -> dict:
    import torch

    from benchmarks.evaluate import range_figures

    t = time.perf_counter()
    ranged, null, weight = range_parts(name, cache_dir, s.art, scales)

    def ratios(x: np.ndarray) -> np.ndarray:
        return np.asarray(ranged.ratios(torch.from_numpy(to_float(x)), 250).numpy())

    gr, tgr = ratios(s.x), ratios(s.tx)
    res = {
        "model": name,
        "artifact": str(
            art_dir.relative_to(cache_dir) if art_dir.is_relative_to(cache_dir) else art_dir
        ),
        "range_scales": scales,
        "balance": weight,
        "eval_clean": len(s.y),
        "eval_triggered": len(s.ty),
        "undefended_clean_accuracy": float(np.mean(s.g.argmax(1) == s.y)),
        "undefended_asr": float(np.mean(s.tg.argmax(1) == s.attacker)),
        "learned_statistic_alone": guard_figures(
            s.g, s.gz, s.y, s.tg, s.tgz, s.ty, s.attacker, s.art.null, s.art.rule.alpha
        ),
        **range_figures(s._replace(gr=gr, tgr=tgr), (null, gr, tgr)),
        "range_null": null.to_dict() | {"samples": None},
        "seconds": round(time.perf_counter() - t, 1),
    }
    # the files without a suffix hold the scales over all classes (the only kind before stop 25)
    suffix = "" if scales == "global" else f"-{scales}"
    out = cache_dir / "eval" / name / f"range-offline-{variant or 'default'}{suffix}.json"
    out.write_text(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", type=model_name)
    parser.add_argument("--variant", default="", help="the scored artifact's variant")
    parser.add_argument(
        "--artifact",
        type=Path,
        help="this artifact's learned bounds instead (one model; --variant names the results)",
    )
    parser.add_argument(
        "--range-scales",
        nargs="+",
        choices=["both", "class", "global"],
        default=["both"],
        help="fit the range detector with each of these (`mmguard calibrate --range-scales`), "
        "side by side on the same guard logits",
    )
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    args = parser.parse_args(argv)
    if args.artifact is not None and (len(args.names) != 1 or not args.variant):
        parser.error("--artifact takes one model and a --variant that names its results")
    problem = variant_problem(args.variant)
    if problem is not None:
        parser.error(problem)
    from benchmarks.cifar import load_cifar10

    data = load_cifar10(args.data, args.cache_dir)
    for name in args.names:
        for r in run(name, args.variant, args.cache_dir, data, args.range_scales, args.artifact):
            two, both = r["learned_statistic_alone"]["p"], r["learned_and_range"]["p"]
            alone = r["range_alone"]
            print(
                f"{name} ({r['range_scales']} scales): guarded ASR {two['asr']:.2%} -> "
                f"{both['asr']:.2%}, clean FPR {two['fpr']:.2%} -> {both['fpr']:.2%}, guarded "
                f"clean acc {two['clean_accuracy']:.2%} -> {both['clean_accuracy']:.2%}; range "
                f"alone AUROC {alone['auroc_full']:.4f}, TPR {alone['tpr']:.2%} at FPR "
                f"{alone['fpr']:.2%}, {alone['matched']['tpr']:.2%} at a matched "
                f"{alone['matched']['fpr']:.2%}; guarded ASR at most "
                f"{alone['asr_bound_any_bounds']:.2%} whatever the learned bounds",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
