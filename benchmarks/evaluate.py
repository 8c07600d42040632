"""Evaluate the guard, and STRIP beside it, on the CIFAR-10 models of ``benchmarks.train_models``.

Run from the repository root::

    .venv/bin/python -m benchmarks.evaluate run clean badnets blended wanet sig chessboard
    .venv/bin/python -m benchmarks.evaluate run longtail step     # MMOM on class imbalance
    .venv/bin/python -m benchmarks.evaluate table                 # markdown tables of all results

For each model: the test split is divided, seeded, into a clean balanced calibration set (50 per
class, the same images as ``benchmarks.calibration``), a clean STRIP split (500 images: STRIP's
blend backgrounds and the set its threshold is chosen on) and the evaluation set (the other 9000).
``mmguard calibrate`` runs with its defaults on the calibration set (once: a later run reuses the
artifact unless ``--recalibrate``; ``--variant V --calibrate-args '...'`` calibrates with other
flags and keeps that artifact and its results apart; ``--calib-per-class N`` with a variant
calibrates on the first N images of each class of that set instead; ``--artifact`` names another
one to score), and then
everything is measured from the exported ONNX files and the manifest alone, in onnxruntime,
with the guard's own decision code (``guard.mmdf.decide``):

- clean accuracy and attack success rate, undefended and guarded; triggered inputs restored to
  their true class; detection TPR and clean FPR; each with the disagreement rule off and on;
- AUROC of the MMDF statistic (clean vs triggered; with a start detector, of -log of the smaller
  of its two p-values) and of STRIP's entropy on the same 1000 clean
  and 1000 triggered evaluation images; STRIP flags at the threshold that gives the same nominal
  FPR (the manifest's alpha) on the STRIP split, never on the images it is scored on;
- the guard's TPR at a matched FPR: the MMDF statistic thresholded at the evaluation set's own
  clean (1 - alpha) quantile, an oracle that compares statistics (calibration variants) apart
  from how well each null fits;
- forward passes per input: 2 for the guard (original and bounded network; 3 with a start
  detector), 1 + 64 for STRIP;
- the guarded figures again for every null kind (``gaussian``, ``yeojohnson``, ``empirical``,
  ``gpd``), each fitted on the same held-out clean statistics as the artifact's own null
  (``renull NAME [--variant V]`` refits them on a scored artifact, for a kind added later).

Imbalanced models (``longtail``, ``step``) are calibrated with ``--objective mmom`` and scored by
the bounded network's accuracy, overall and per class, against the original's.

Results go to ``CACHE/eval/NAME/results.json``; figures (ROC curves, statistic histograms) to
``docs/figures/``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.attacks import ATTACKS, Attack
from benchmarks.calibrating import calibrate_cifar, factory_for
from benchmarks.evalmetrics import low_tail_threshold, tpr_at_fpr
from benchmarks.train_models import IMBALANCED, NAMES, model_name, model_paths, parse_name
from calibrate import strip
from calibrate.cifar_resnet import DEFAULT_WIDTH
from calibrate.scoring import attack_figures, auroc, roc_curve

REPO_ROOT = Path(__file__).resolve().parents[1]
CALIB_PER_CLASS = 50
STRIP_SPLIT = 500
STRIP_BLENDS = strip.BLENDS
STRIP_SCORED = 1000
"""Clean and triggered evaluation images each that STRIP (65 forward passes each) is scored on."""
EVAL_ATTACK = "badnets"
"""The trigger shown to the attack-free model, to measure what the detector does on it."""


def split_test(y: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration, STRIP split, evaluation) indices into the test split, disjoint and sorted."""
    rng = np.random.default_rng(seed)
    calib = np.concatenate(
        [rng.choice(np.flatnonzero(y == k), CALIB_PER_CLASS, replace=False) for k in np.unique(y)]
    )
    rest = np.setdiff1d(np.arange(y.size), calib)
    strip = np.random.default_rng(seed + 1).choice(rest, STRIP_SPLIT, replace=False)
    evaluation = np.setdiff1d(rest, strip)
    return np.sort(calib), np.sort(strip), evaluation


def variant_problem(variant: str) -> str | None:
    """Why ``--variant`` cannot name files (None if it can: empty, or letters, digits, _ and .)."""
    if variant and not re.fullmatch(r"[A-Za-z0-9_.]+", variant):
        return f"--variant {variant!r}: use letters, digits, '_' and '.' only"
    return None


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """The indices, in order, of the first ``n`` images of each class in ``labels`` (all of a
    class with fewer)."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:n]] = True
    return np.flatnonzero(keep)


def to_float(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_uint8_nhwc.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def calibrate(
    weights: Path,
    data_npz: Path,
    out: Path,
    name: str,
    objective: str,
    extra: Sequence[str] = (),
    width: int = DEFAULT_WIDTH,
    arch: str | None = None,
) -> float:
    """``mmguard calibrate`` with its defaults, ``--objective`` and ``extra`` flags, on the
    network of ``width`` (and ``arch``, ResNet-18 by default); returns the wall seconds."""
    flags = ["--objective", objective, *extra]
    factory = factory_for(width, arch)
    return calibrate_cifar(weights, data_npz, out, f"cifar10-{name}", flags, factory)[2]


def batched(fn: Any, x: np.ndarray, bs: int = 500) -> Any:
    """Apply ``fn`` (returning an array or a tuple of arrays, where an entry may be None, as
    the engine's start logits without a start detector) in chunks and concatenate."""
    parts = [fn(x[i : i + bs]) for i in range(0, len(x), bs)]
    if isinstance(parts[0], tuple):
        return tuple(None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True))
    return np.concatenate(parts)


def guard_figures(
    g: np.ndarray,
    gz: np.ndarray,
    y: np.ndarray,
    tg: np.ndarray,
    tgz: np.ndarray,
    ty: np.ndarray,
    attacker: np.ndarray,
    null: Any,
    alpha: float,
    extras: Extras | None = None,
) -> dict[str, Any]:
    """Guarded figures on clean (g, gz, y) and triggered (tg, tgz, ty) inputs under ``null``,
    with the disagreement rule off (``p``) and on (``p_dis``). ``extras``: the start and/or
    range detectors on the clean and the triggered inputs (:func:`extra_detectors`)."""
    from guard.mmdf import DecisionRule, decide

    on_clean, on_trig = extras if extras is not None else ((None, None), (None, None))
    out: dict[str, Any] = {}
    for tag, dis in (("p", False), ("p_dis", True)):
        rule = DecisionRule(alpha, flag_on_disagreement=dis)
        clean = decide(g, gz, null, rule, *on_clean)
        trig = decide(tg, tgz, null, rule, *on_trig)
        out[tag] = attack_figures(clean, y, trig, ty, attacker)
    return out


THREADS = [2]  # torch and onnxruntime threads of a `run` (its --threads)


def null_variants(art_dir: Path) -> dict[str, Any]:
    """Every null kind fitted on the very held-out clean statistics the artifact's null used."""
    from guard.mmdf import NULL_KINDS, fit_null

    stats = np.asarray(json.loads((art_dir / "report.json").read_text())["clean_statistics"])
    return {kind: fit_null(stats, kind) for kind in NULL_KINDS}  # type: ignore[arg-type]


def strip_scores(
    original: Any,
    x: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    exclude_self: bool = False,
) -> np.ndarray:
    """STRIP entropy of each uint8 NHWC image in x, each blended with STRIP_BLENDS images drawn
    from pool (calibrate.strip.strip_scores). With ``exclude_self`` x is the pool itself, and
    image i is never blended with itself."""
    return strip.strip_scores(
        original, x, pool, rng, exclude_self, blends=STRIP_BLENDS, prepare=to_float
    )


class GuardLogits(NamedTuple):
    """The networks' logits on the clean evaluation images (x, labels y) and their triggered
    copies (tx, true labels ty, the attacker's labels), and what produced them. gs and tgs: the
    start detector's logits, None when the artifact has none."""

    art: Any
    engine: Any
    attack: Attack
    x: np.ndarray
    tx: np.ndarray
    g: np.ndarray
    gz: np.ndarray
    y: np.ndarray
    tg: np.ndarray
    tgz: np.ndarray
    ty: np.ndarray
    attacker: np.ndarray
    seconds: float
    gs: np.ndarray | None = None
    tgs: np.ndarray | None = None
    gr: np.ndarray | None = None  # the range detector's activation ratios, clean
    tgr: np.ndarray | None = None  # and triggered

    def start(self) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """The artifact's start null and logits (clean, triggered), or None."""
        if self.art.start_null is None or self.gs is None or self.tgs is None:
            return None
        return self.art.start_null, self.gs, self.tgs

    def ranged(self) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """The artifact's range null and activation ratios (clean, triggered), or None."""
        if self.art.range_null is None or self.gr is None or self.tgr is None:
            return None
        return self.art.range_null, self.gr, self.tgr

    def extras(self) -> Extras | None:
        """guard_figures' ``extras`` argument: the artifact's own extra detectors."""
        return extra_detectors(self.start(), self.ranged())

    def detection_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """What ranks clean against triggered inputs: the MMDF statistic d; with a start or a
        range detector, -log of the smallest of the p-values (the order of the combined
        p-value, which ties at 1)."""
        from guard.mmdf import p_values, range_statistic, statistic

        d_clean, d_trig = statistic(self.g, self.gz), statistic(self.tg, self.tgz)
        start, ranged = self.start(), self.ranged()
        if start is None and ranged is None:
            return d_clean, d_trig
        tiny = np.finfo(np.float64).tiny

        def score(g: np.ndarray, d: np.ndarray, gs: Any, gr: Any) -> np.ndarray:
            p = p_values(self.art.null, d)
            if start is not None:
                p = np.minimum(p, p_values(start[0], statistic(g, gs)))
            if ranged is not None:
                p = np.minimum(p, p_values(ranged[0], range_statistic(gr)))
            return np.asarray(-np.log(np.maximum(p, tiny)))

        return (
            score(self.g, d_clean, self.gs, self.gr),
            score(self.tg, d_trig, self.tgs, self.tgr),
        )


Extras = tuple[tuple[Any, Any], tuple[Any, Any]]
"""(start, range) detectors for ``guard.mmdf.decide`` on the clean and on the triggered inputs."""


def extra_detectors(
    start: tuple[Any, np.ndarray, np.ndarray] | None = None,
    ranged: tuple[Any, np.ndarray, np.ndarray] | None = None,
) -> Extras | None:
    """The detectors beside the learned bounds' statistic, from (null, clean, triggered) of the
    start detector's logits and of the range detector's ratios; None without either."""
    from guard.mmdf import RangeDetector, StartDetector

    if start is None and ranged is None:
        return None
    sd = (None, None) if start is None else (StartDetector(start[1], start[0]),
                                             StartDetector(start[2], start[0]))  # fmt: skip
    rd = (None, None) if ranged is None else (RangeDetector(ranged[1], ranged[0]),
                                              RangeDetector(ranged[2], ranged[0]))  # fmt: skip
    return (sd[0], rd[0]), (sd[1], rd[1])


def guard_logits(
    name: str, art_dir: Path, data: dict[str, np.ndarray], idx: tuple[np.ndarray, ...]
) -> GuardLogits:
    """Both networks' logits on the clean evaluation images and their triggered copies (the
    model's own attack; the BadNets trigger for the attack-free model), in onnxruntime."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    eval_idx = idx[2]
    attack: Attack = ATTACKS.get(parse_name(name)[0], ATTACKS[EVAL_ATTACK])
    art = load_artifact(art_dir)
    engine = GuardEngine(art, "cpu", threads=THREADS[0])
    x, y = data["x_test"][eval_idx], data["y_test"][eval_idx]
    mask = attack.eval_mask(y)
    tx, ty = attack.trigger(x[mask]), y[mask]
    attacker = attack.attacker_labels(ty)
    t = time.perf_counter()
    g, gz, gs, gr = batched(lambda b: engine.logits(to_float(b)), x)
    tg, tgz, tgs, tgr = batched(lambda b: engine.logits(to_float(b)), tx)
    seconds = time.perf_counter() - t
    return GuardLogits(
        art, engine, attack, x, tx, g, gz, y, tg, tgz, ty, attacker, seconds, gs, tgs, gr, tgr
    )


def rescore_nulls(
    name: str, art_dir: Path, data: dict[str, np.ndarray], idx: tuple[np.ndarray, ...]
) -> dict[str, Any]:
    """``by_null`` again, for every null kind this code knows (one added after a model was
    scored), without recalibrating or rerunning STRIP."""
    s = guard_logits(name, art_dir, data, idx)
    alpha = s.art.rule.alpha
    return {
        kind: guard_figures(s.g, s.gz, s.y, s.tg, s.tgz, s.ty, s.attacker, null, alpha, s.extras())
        for kind, null in null_variants(art_dir).items()
    }


def evaluate_attack(
    name: str,
    art_dir: Path,
    data: dict[str, np.ndarray],
    idx: tuple[np.ndarray, ...],
    fig_dir: Path,
    suffix: str = "",
) -> dict[str, Any]:
    _, strip_idx, _ = idx
    logits = guard_logits(name, art_dir, data, idx)
    art, engine, attack, x, tx, g, gz, y, tg, tgz, ty, attacker, guard_s = logits[:13]
    start, ranged, extras = logits.start(), logits.ranged(), logits.extras()
    res: dict[str, Any] = {
        "undefended_clean_accuracy": float(np.mean(g.argmax(1) == y)),
        "undefended_asr": float(np.mean(tg.argmax(1) == attacker)),
        "undefended_restored": float(np.mean(tg.argmax(1) == ty)),
        "null": art.null.kind,
    }
    res.update(guard_figures(g, gz, y, tg, tgz, ty, attacker, art.null, art.rule.alpha, extras))
    res["by_null"] = {
        kind: guard_figures(g, gz, y, tg, tgz, ty, attacker, null, art.rule.alpha, extras)
        for kind, null in null_variants(art_dir).items()
    }
    if extras is not None:  # the same artifact as the two-network guard, for comparison
        from guard.mmdf import statistic

        res["without_start_detector" if ranged is None else "learned_statistic_alone"] = {
            **guard_figures(g, gz, y, tg, tgz, ty, attacker, art.null, art.rule.alpha),
            "auroc_full": auroc(statistic(g, gz), statistic(tg, tgz)),
        }
    if start is not None:
        res["start_null"] = start[0].kind
    if ranged is not None:
        res.update(range_figures(logits, ranged))
    res.update(
        attack=attack.record()
        | {"trigger_shown_to_clean_model": parse_name(name)[0] not in ATTACKS},
        eval_clean=len(y),
        eval_triggered=len(ty),
        alpha=art.rule.alpha,
        provider=engine.providers[0],
        guard_forward_passes_per_input=2 if start is None else 3,
        range_detector=ranged is not None,
        strip_forward_passes_per_input=1 + STRIP_BLENDS,
        guard_seconds=round(guard_s, 1),
    )
    d_clean, d_trig = logits.detection_scores()
    res["auroc_guard_full"] = auroc(d_clean, d_trig)
    tpr, fpr = tpr_at_fpr(d_clean, d_trig, art.rule.alpha)
    res["guard_at_matched_fpr"] = {"tpr": tpr, "fpr": fpr}

    # STRIP on the same subset the guard's AUROC is compared on.
    rng = np.random.default_rng(7)
    sc = rng.choice(len(y), min(STRIP_SCORED, len(y)), replace=False)
    st = rng.choice(len(ty), min(STRIP_SCORED, len(ty)), replace=False)
    pool = data["x_test"][strip_idx]
    t = time.perf_counter()
    h_split = strip_scores(engine.original_logits, pool, pool, rng, exclude_self=True)
    h_clean = strip_scores(engine.original_logits, x[sc], pool, rng)
    h_trig = strip_scores(engine.original_logits, tx[st], pool, rng)
    strip_s = time.perf_counter() - t
    thr = low_tail_threshold(h_split, art.rule.alpha)
    res["strip"] = {
        "threshold_bits": thr,
        "fpr": float(np.mean(h_clean < thr)),
        "tpr": float(np.mean(h_trig < thr)),
        "auroc": auroc(-h_clean, -h_trig),
        "seconds": round(strip_s, 1),
        "scored_clean": len(sc),
        "scored_triggered": len(st),
    }
    res["auroc_guard_subset"] = auroc(d_clean[sc], d_trig[st])
    plot_attack(
        name + suffix, fig_dir, d_clean, d_trig, (d_clean[sc], d_trig[st]), (-h_clean, -h_trig)
    )
    return res


def range_figures(s: GuardLogits, ranged: tuple[Any, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The range detector's statistic tested on its own at alpha (its null only; the guard
    never serves it alone) and the two-network guard with it (its artifact's start detector,
    if any, left out), for comparison with the served figures."""
    from guard.mmdf import p_values, range_statistic

    null, gr, tgr = ranged
    r_clean, r_trig = range_statistic(gr), range_statistic(tgr)
    tpr, fpr = tpr_at_fpr(r_clean, r_trig, s.art.rule.alpha)
    learned_and_range = guard_figures(
        s.g, s.gz, s.y, s.tg, s.tgz, s.ty, s.attacker, s.art.null, s.art.rule.alpha,
        extra_detectors(None, ranged),
    )  # fmt: skip

    # Served beside the learned statistic, the range statistic is tested at alpha / 2
    # (Bonferroni over two). An input it flags is labelled some class other than the original
    # decision, so a triggered input can reach the attacker's class only if the range detector
    # misses it while the original decision is the attacker's, or if the original decision is
    # not (the attack failed on it) and a flag corrects it into the attacker's class: whatever
    # learned bounds a calibration draws, guarded ASR is at most the sum of those two shares.
    reaches = s.tg.argmax(1) == s.attacker
    missed = p_values(null, r_trig) >= s.art.rule.alpha / 2
    alone = {
        "fpr": float(np.mean(p_values(null, r_clean) < s.art.rule.alpha)),
        "tpr": float(np.mean(p_values(null, r_trig) < s.art.rule.alpha)),
        "auroc_full": auroc(r_clean, r_trig),
        "matched": {"tpr": tpr, "fpr": fpr},
        "asr_bound_any_bounds": float(np.mean(missed & reaches) + np.mean(~reaches)),
    }
    return {"range_null": null.kind, "range_alone": alone, "learned_and_range": learned_and_range}


def evaluate_mmom(
    name: str, art_dir: Path, data: dict[str, np.ndarray], idx: tuple[np.ndarray, ...]
) -> dict[str, Any]:
    """Accuracy of the original and the MMOM-bounded network on the test split minus calibration."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    _, strip_idx, eval_idx = idx
    keep = np.sort(np.concatenate([strip_idx, eval_idx]))
    x, y = data["x_test"][keep], data["y_test"][keep]
    engine = GuardEngine(load_artifact(art_dir), "cpu", threads=THREADS[0])
    g, gz = batched(lambda b: engine.logits(to_float(b)), x)[:2]
    pred, pred_z = g.argmax(1), gz.argmax(1)
    classes = np.unique(y)
    return {
        "eval_images": len(y),
        "undefended_accuracy": float(np.mean(pred == y)),
        "mmom_accuracy": float(np.mean(pred_z == y)),
        "undefended_per_class": [float(np.mean(pred[y == c] == c)) for c in classes],
        "mmom_per_class": [float(np.mean(pred_z[y == c] == c)) for c in classes],
    }


def plot_attack(
    name: str,
    fig_dir: Path,
    d_clean: np.ndarray,
    d_trig: np.ndarray,
    guard_subset: tuple[np.ndarray, np.ndarray],
    strip_subset: tuple[np.ndarray, np.ndarray],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, (neg, pos) in (("MMDF statistic", guard_subset), ("STRIP -entropy", strip_subset)):
        fpr, tpr = roc_curve(neg, pos)
        ax1.plot(fpr, tpr, label=f"{label} (AUROC {auroc(neg, pos):.3f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {name}")
    ax1.legend(loc="lower right", fontsize=8)
    lo, hi = np.percentile(np.concatenate([d_clean, d_trig]), [0.5, 99.5])
    bins = np.linspace(lo, hi, 60)
    ax2.hist(np.clip(d_clean, lo, hi), bins, alpha=0.6, density=True, label="clean")
    ax2.hist(np.clip(d_trig, lo, hi), bins, alpha=0.6, density=True, label="triggered")
    ax2.set(xlabel="MMDF statistic", ylabel="density", title=f"Statistic: {name}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / f"{name}.png", dpi=80)
    plt.close(fig)


def run(names: list[str], args: argparse.Namespace) -> None:
    from benchmarks.cifar import load_cifar10

    data = load_cifar10(args.data, args.cache_dir)
    idx = split_test(data["y_test"])
    calib_npz = args.cache_dir / "eval" / "calib.npz"
    calib_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        calib_npz,
        images=data["x_test"][idx[0]],
        labels=data["y_test"][idx[0]],
        class_names=data["class_names"],
    )
    if args.calib_per_class:  # a smaller calibration set: the first N of each class of it
        keep = idx[0][first_per_class(data["y_test"][idx[0]], args.calib_per_class)]
        calib_npz = calib_npz.with_name(f"calib{args.calib_per_class}.npz")
        np.savez(
            calib_npz,
            images=data["x_test"][keep],
            labels=data["y_test"][keep],
            class_names=data["class_names"],
        )
    for name in names:
        out_dir = args.cache_dir / "eval" / name
        weights, record_path = model_paths(args.cache_dir, name)
        if not weights.exists():
            print(f"{name}: no trained model at {weights}; skipped", file=sys.stderr)
            continue
        suffix = f"-{args.variant}" if args.variant else ""
        art_dir = args.artifact or out_dir / f"artifact{suffix}"
        objective = "mmom" if parse_name(name)[0] in IMBALANCED else "mmac"
        result: dict[str, Any] = {"model": json.loads(record_path.read_text())}
        if args.variant:
            result["variant"] = {"name": args.variant, "calibrate_args": args.calibrate_args}
            if args.calib_per_class:
                result["variant"]["calib_per_class"] = args.calib_per_class
        previous = out_dir / f"results{suffix}.json"
        reuse = args.artifact is not None or (
            not args.recalibrate and (art_dir / "manifest.json").exists()
        )
        if not reuse:
            print(f"{name}{suffix}: calibrating ({objective}) ...", file=sys.stderr, flush=True)
            extra = shlex.split(args.calibrate_args)
            width = int(result["model"].get("width", DEFAULT_WIDTH))
            arch = result["model"].get("arch")
            result["calibrate_seconds"] = round(
                calibrate(weights, calib_npz, art_dir, name, objective, extra, width, arch), 1
            )
        elif args.artifact is None and previous.exists():
            result["calibrate_seconds"] = json.loads(previous.read_text()).get("calibrate_seconds")
        report = json.loads((art_dir / "report.json").read_text())
        result["mmbd"] = report.get("mmbd")
        print(f"{name}: evaluating ...", file=sys.stderr, flush=True)
        if parse_name(name)[0] in IMBALANCED:
            result["mmom"] = evaluate_mmom(name, art_dir, data, idx)
        else:
            result.update(evaluate_attack(name, art_dir, data, idx, args.fig_dir, suffix))
        previous.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)


def renull(names: list[str], args: argparse.Namespace) -> None:
    """Refit every null kind on each scored artifact's held-out statistics and update the
    ``by_null`` entry of its results file; the artifact's own figures must come out unchanged."""
    from benchmarks.cifar import load_cifar10

    data = load_cifar10(args.data, args.cache_dir)
    idx = split_test(data["y_test"])
    suffix = f"-{args.variant}" if args.variant else ""
    for name in names:
        path = args.cache_dir / "eval" / name / f"results{suffix}.json"
        if not path.exists():
            print(f"{name}{suffix}: no results at {path}; skipped", file=sys.stderr)
            continue
        result = json.loads(path.read_text())
        if "p" not in result:
            continue  # MMOM models are scored by accuracy, not by a null
        by_null = rescore_nulls(name, path.parent / f"artifact{suffix}", data, idx)
        own = by_null[result["null"]]
        if own["p"] != result["p"]:
            raise SystemExit(f"{name}{suffix}: the artifact no longer gives its recorded figures")
        result["by_null"] = by_null
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}{suffix}: by_null now {', '.join(by_null)}", file=sys.stderr, flush=True)


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _is_model(name: str) -> bool:
    try:
        parse_name(name)
    except ValueError:
        return False
    return True


def _earlier_defaults(cache_dir: Path, name: str) -> list[str]:
    """How NAME's artifact was calibrated where today's defaults differ, in words (empty when
    they do not): the MM-BD ascent's steps, the bound ceiling (absent before it existed), and
    the range detector (off before it was on by default; this benchmark's 200 held-out images
    carry its null)."""
    from calibrate.config import CalibrationConfig

    report = cache_dir / "eval" / name / "artifact" / "report.json"
    if not report.is_file():
        return []
    config, today = json.loads(report.read_text())["config"], CalibrationConfig()
    found = []
    if config["mmbd_steps"] != today.mmbd_steps:
        found.append(f"MM-BD ascent of {config['mmbd_steps']} steps")
    if config.get("bound_ceiling", "none") != today.bound_ceiling:
        found.append(f"bound ceiling {config.get('bound_ceiling', 'none')}")
    if today.range_detector is None and not config.get("range_detector"):
        found.append("no range detector")
    return found


def table(cache_dir: Path, null_kind: str | None = None, variant: str = "") -> str:
    """Markdown tables of every results.json under CACHE/eval (results-VARIANT.json with
    ``variant``); the first with ``null_kind``'s figures (refitted on the artifact's held-out
    statistics), or the artifact's own null. A model whose default artifact was calibrated with
    earlier defaults is marked "(*)"."""
    fname = f"results-{variant}.json" if variant else "results.json"
    found = {p.parent.name for p in (cache_dir / "eval").glob(f"*/{fname}")}
    extra = sorted(n for n in found - set(NAMES) if _is_model(n))
    rows = {n: cache_dir / "eval" / n / fname for n in (*NAMES, *extra)}
    res = {n: json.loads(p.read_text()) for n, p in rows.items() if p.exists()}
    older = {} if variant else {n: e for n in res if (e := _earlier_defaults(cache_dir, n))}
    lines = [
        "| model | undefended clean acc | guarded clean acc (p / p+dis) | undefended ASR "
        "| guarded ASR (p / p+dis) | restored (p / p+dis) | TPR (p / p+dis) "
        "| clean FPR (p / p+dis) | AUROC MMDF | AUROC STRIP | STRIP TPR / FPR | MM-BD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in res.items():
        if parse_name(n)[0] in IMBALANCED:
            continue
        if null_kind and null_kind not in r["by_null"]:
            print(f"{n}: no {null_kind} figures; `renull {n}` adds them", file=sys.stderr)
            continue
        figs = r["by_null"][null_kind] if null_kind else r
        p, q, s = figs["p"], figs["p_dis"], r["strip"]
        mmbd = r.get("mmbd") or {}
        verdict = (
            f"{'backdoor, class ' + str(mmbd.get('target')) if mmbd.get('suspected') else 'clean'}"
            f" (p={mmbd.get('p_value', float('nan')):.2g})"
        )
        asr_undef = pct(r["undefended_asr"])
        mark = " (*)" if n in older else ""
        lines.append(
            f"| {n}{mark} | {pct(r['undefended_clean_accuracy'])} | {pct(p['clean_accuracy'])} / "
            f"{pct(q['clean_accuracy'])} | {asr_undef} | {pct(p['asr'])} / {pct(q['asr'])} | "
            f"{pct(p['restored'])} / {pct(q['restored'])} | {pct(p['tpr'])} / {pct(q['tpr'])} | "
            f"{pct(p['fpr'])} / {pct(q['fpr'])} | {r['auroc_guard_subset']:.4f} | "
            f"{s['auroc']:.4f} | {pct(s['tpr'])} / {pct(s['fpr'])} | {verdict} |"
        )
    if older:
        notes = sorted({"; ".join(e) for e in older.values()})
        lines += [
            "",
            f"(*) calibrated with earlier defaults ({' | '.join(notes)}); "
            f"the others with today's defaults.",
        ]
    lines += [
        "",
        "| model | null | clean FPR | guarded clean acc | guarded ASR | restored | TPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in res.items():
        for kind, figs in r.get("by_null", {}).items():
            p = figs["p"]
            lines.append(
                f"| {n} | {kind} | {pct(p['fpr'])} | {pct(p['clean_accuracy'])} | "
                f"{pct(p['asr'])} | {pct(p['restored'])} | {pct(p['tpr'])} |"
            )
    variants = sorted((cache_dir / "eval").glob("*/results-*.json"))
    with_defaults = [
        (path, r)
        for model in sorted({v.parent for v in variants})
        for path in (model / "results.json", *sorted(model.glob("results-*.json")))
        if path.exists() and "p" in (r := json.loads(path.read_text()))  # attacks, not MMOM
    ]
    if with_defaults:
        lines += [
            "",
            "| model | calibration variant | mmguard calibrate flags | clean FPR "
            "| guarded clean acc | guarded ASR | TPR | TPR at a matched FPR | AUROC MMDF "
            "| MM-BD p |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for path, r in with_defaults:
            v, p = r.get("variant", {"name": "default", "calibrate_args": ""}), r["p"]
            m = r.get("guard_at_matched_fpr")
            matched = f"{pct(m['tpr'])} (FPR {pct(m['fpr'])})" if m else "-"
            lines.append(
                f"| {path.parent.name} | {v['name']} | `{v['calibrate_args'] or '(defaults)'}` | "
                f"{pct(p['fpr'])} | {pct(p['clean_accuracy'])} | {pct(p['asr'])} | "
                f"{pct(p['tpr'])} | {matched} | {r['auroc_guard_subset']:.4f} | "
                f"{(r.get('mmbd') or {}).get('p_value', float('nan')):.2g} |"
            )
    imb = [(n, r) for n, r in res.items() if parse_name(n)[0] in IMBALANCED]
    if imb:
        lines += [
            "",
            "| model | undefended acc | MMOM acc | gain (points) | per-class undefended "
            "| per-class MMOM |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in imb:
            m = r["mmom"]
            gain = 100 * (m["mmom_accuracy"] - m["undefended_accuracy"])
            lines.append(
                f"| {n} | {pct(m['undefended_accuracy'])} | {pct(m['mmom_accuracy'])} | "
                f"{gain:+.2f} | {' '.join(f'{100 * v:.0f}' for v in m['undefended_per_class'])} "
                f"| {' '.join(f'{100 * v:.0f}' for v in m['mmom_per_class'])} |"
            )
    return "\n".join(lines)


def export_sets(attack_name: str, data: dict[str, np.ndarray], out: Path) -> tuple[Path, Path]:
    """The evaluation images of `run` as `mmguard evaluate` reads them: out/clean.npz (the 9,000
    clean evaluation images, their labels) and out/triggered-ATTACK.npz (their triggered copies
    that count for attack success, their true labels and the attacker's, `target_labels`)."""
    attack: Attack = ATTACKS[attack_name]
    eval_idx = split_test(data["y_test"])[2]
    x, y = data["x_test"][eval_idx], data["y_test"][eval_idx]
    mask = attack.eval_mask(y)
    names = data["class_names"]
    out.mkdir(parents=True, exist_ok=True)
    clean, trig = out / "clean.npz", out / f"triggered-{attack_name}.npz"
    np.savez(clean, images=x, labels=y, class_names=names)
    np.savez(
        trig,
        images=attack.trigger(x[mask]),
        labels=y[mask],
        target_labels=attack.attacker_labels(y[mask]),
        class_names=names,
    )
    return clean, trig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="calibrate (unless --artifact) and evaluate models")
    r.add_argument("names", nargs="+", type=model_name, help=f"{', '.join(NAMES)} [_eN]")
    r.add_argument(
        "--variant",
        default="",
        help="a calibration variant: its artifact, results and figure are kept apart from the "
        "default's (CACHE/eval/NAME/artifact-VARIANT, results-VARIANT.json, NAME-VARIANT.png)",
    )
    r.add_argument(
        "--calibrate-args",
        default="",
        help="extra mmguard calibrate flags for --variant, as one argument: "
        "--calibrate-args='--schedule reference'",
    )
    r.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="score this artifact (one model, with --variant)",
    )
    r.add_argument(
        "--calib-per-class",
        type=int,
        default=0,
        metavar="N",
        help="calibrate on the first N images of each class of the calibration set (50 per "
        "class) instead of all of them (with --variant)",
    )
    r.add_argument(
        "--recalibrate", action="store_true", help="calibrate even if CACHE/eval/NAME has one"
    )
    r.add_argument("--fig-dir", type=Path, default=REPO_ROOT / "docs" / "figures")
    r.add_argument(
        "--threads",
        type=int,
        default=THREADS[0],
        help="torch and onnxruntime threads (default %(default)s; 1 for two runs side by side)",
    )
    n = sub.add_parser(
        "renull", help="refit every null kind on scored artifacts (updates by_null only)"
    )
    n.add_argument("names", nargs="+", type=model_name)
    n.add_argument("--variant", default="", help="the calibration variant to rescore")
    e = sub.add_parser(
        "export", help="write the evaluation images of an attack as `mmguard evaluate` reads them"
    )
    e.add_argument("attacks", nargs="+", choices=sorted(ATTACKS))
    e.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table", help="print markdown tables of all results")
    t.add_argument(
        "--null",
        default=None,
        help="main table under this null kind (default: each artifact's own null)",
    )
    t.add_argument("--variant", default="", help="main table of this calibration variant")
    for p in (r, n, e):
        p.add_argument(
            "--data",
            type=Path,
            default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz",
        )
    for p in (r, n, t, e):
        p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        from benchmarks.cifar import load_cifar10

        data = load_cifar10(args.data, args.cache_dir)
        for name in args.attacks:
            print(*export_sets(name, data, args.out))
        return 0
    if args.cmd == "table":
        print(table(args.cache_dir, args.null, args.variant))
        return 0
    if args.cmd == "renull":
        renull(args.names, args)
        return 0
    if args.artifact is not None and len(args.names) != 1:
        parser.error("--artifact scores one model: name exactly one")
    if variant_problem(args.variant):
        parser.error(variant_problem(args.variant))
    if args.artifact is not None and not args.variant:
        parser.error("--artifact needs --variant, so that its results do not replace the default's")
    if args.calib_per_class < 0:
        parser.error(f"--calib-per-class {args.calib_per_class}: give a positive count")
    if args.calib_per_class and (not args.variant or args.artifact is not None):
        parser.error(
            "--calib-per-class calibrates a --variant (and scores no --artifact), so that its "
            "results do not replace the default's"
        )
    if args.calibrate_args and not args.variant:
        parser.error(
            "--calibrate-args needs --variant, so that its results do not replace the default's"
        )
    import torch

    THREADS[0] = max(args.threads, 1)
    torch.set_num_threads(THREADS[0])
    run(args.names, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
