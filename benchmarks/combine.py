"""Two statistics on one input: the learned (MMAC) bounds' and the start bounds' (``--schedule
detect``), each under its own null, flagged when either p-value is below alpha / 2 (Bonferroni,
so the nominal false-positive rate stays alpha). ``mmguard calibrate --start-detector`` now
builds this guard in one calibration (its start bounds are the ``detect`` variant's, see
tests/test_start_detector.py); this script scores it from two separate artifacts, with every
pair of nulls. Three forward passes per input instead of two.

Run from the repository root, after ``benchmarks.evaluate run NAME`` and
``benchmarks.evaluate run NAME --variant iter1 --calibrate-args '--max-iters 1 --min-iters 0
--overtime-iters 0'``::

    .venv/bin/python -m benchmarks.combine wanet badnets blended

For each model it prints a markdown row for each statistic alone under each null ("-" for the
statistic not used), then one per pair of nulls (learned / start) for both together, and
writes ``CACHE/eval/NAME/combined-VARIANT.json``. A flagged input gets its bounded network's best
class other than the original decision, as in SPEC 4.5 (the learned one's, for both together).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.evalmetrics import tpr_at_fpr
from benchmarks.evaluate import (
    REPO_ROOT,
    extra_detectors,
    guard_figures,
    guard_logits,
    null_variants,
    split_test,
)
from benchmarks.train_models import model_name
from calibrate.scoring import auroc

PAIRS = (("yeojohnson", "gpd"), ("gpd", "gpd"), ("yeojohnson", "yeojohnson"))


def combine(name: str, cache_dir: Path, data: dict[str, np.ndarray], variant: str) -> list[dict]:
    from guard.mmdf import statistic

    idx = split_test(data["y_test"])
    base = cache_dir / "eval" / name
    learned = guard_logits(name, base / "artifact", data, idx)
    start = guard_logits(name, base / f"artifact-{variant}", data, idx)
    g, gz_l, y, tg, tgz_l = learned.g, learned.gz, learned.y, learned.tg, learned.tgz
    ty, attacker, gz_s, tgz_s = learned.ty, learned.attacker, start.gz, start.tgz
    if not np.allclose(g, start.g, atol=1e-3):
        raise SystemExit(f"{name}: the two artifacts' original networks differ")
    alpha = learned.art.rule.alpha
    nulls_l, nulls_s = null_variants(base / "artifact"), null_variants(base / f"artifact-{variant}")
    rows = []
    # each statistic alone first (what `mmguard serve` runs with either artifact)
    for which, (nulls, gl, tgl) in (
        ("learned", (nulls_l, gz_l, tgz_l)),
        ("start", (nulls_s, gz_s, tgz_s)),
    ):
        d_clean, d_trig = statistic(g, gl), statistic(tg, tgl)
        tpr, _ = tpr_at_fpr(d_clean, d_trig, alpha)
        for kind in ("yeojohnson", "gpd"):
            figs = guard_figures(g, gl, y, tg, tgl, ty, attacker, nulls[kind], alpha)["p"]
            rows.append(
                {"null_learned": kind if which == "learned" else "-",
                 "null_start": kind if which == "start" else "-",
                 **figs, "matched_tpr": tpr, "auroc": auroc(d_clean, d_trig)}
            )  # fmt: skip
    for kind_l, kind_s in PAIRS:  # both together: guard.mmdf.decide with a start detector
        start_s = extra_detectors((nulls_s[kind_s], gz_s, tgz_s))
        figs = guard_figures(g, gz_l, y, tg, tgz_l, ty, attacker, nulls_l[kind_l], alpha, start_s)
        rows.append({"null_learned": kind_l, "null_start": kind_s, **figs["p"]})
    out_path = base / f"combined-{variant}.json"
    out_path.write_text(json.dumps({"variant": variant, "rows": rows}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", type=model_name)
    parser.add_argument("--variant", default="iter1", help="the start bounds' variant")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    args = parser.parse_args(argv)
    from benchmarks.cifar import load_cifar10

    data = load_cifar10(args.data, args.cache_dir)
    print(
        "| model | null, learned / start | clean FPR | guarded clean acc | guarded ASR "
        "| restored | TPR | TPR at a matched FPR | AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.names:
        for r in combine(name, args.cache_dir, data, args.variant):
            figs = " | ".join(
                f"{100 * r[k]:.2f}" for k in ("fpr", "clean_accuracy", "asr", "restored", "tpr")
            )
            single = f"{100 * r['matched_tpr']:.2f} | {r['auroc']:.4f}" if "auroc" in r else "- | -"
            print(
                f"| {name} | {r['null_learned']} / {r['null_start']} | {figs} | {single} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
