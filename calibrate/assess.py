"""`mmguard evaluate`: an artifact's guard measured on labelled clean test images and on the
same attack's triggered ones, decided exactly as `mmguard serve` decides (the same onnxruntime
engine, nulls and decision code; no server in between), with the figures a user compares
defences on: clean accuracy and attack success, undefended and guarded; triggered inputs
restored to their true class; the flag rates on clean inputs (false positives) and on
triggered ones (true positives); each with the disagreement rule off and on; the AUROC of the
guard's p-value; and the forward passes per input. With `--strip-pool`, STRIP beside it on the
same inputs (64 blends per input with the pool's images, its threshold set on the pool for the
same clean flag rate alpha).

The triggered images carry their TRUE labels. The class the attacker wants is `--target` for
every one of them (all-to-one), or an .npz array `target_labels`, one per image (e.g. an
all-to-all attack). Triggered images whose true class is already the attacker's say nothing
about the attack and are left out (the count is reported)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate.errors import CalibrationError
from calibrate.strip import BLENDS

if TYPE_CHECKING:
    from guard.engine import Device

DEFAULT_BATCH = 256
STRIP_POOL_MIN = BLENDS + 1
"""Images a STRIP pool needs: each pool image is blended with BLENDS others for the threshold."""
STRIP_LIMIT = 1000
"""Clean and triggered inputs STRIP scores at most, each (as the benchmark's STRIP_SCORED)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="measure an artifact's guard on clean and triggered test images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact", type=Path, required=True, help="an `mmguard calibrate` output")
    p.add_argument(
        "--clean",
        type=Path,
        required=True,
        help="clean test images with their labels: an ImageFolder directory or an .npz with "
        "`images` and `labels` (as `mmguard calibrate --data` reads them); never the images "
        "the artifact was calibrated on",
    )
    p.add_argument(
        "--triggered",
        type=Path,
        required=True,
        help="the attack's triggered test images with their TRUE labels (same formats); an "
        ".npz may add `target_labels`, the attacker's class for each image",
    )
    p.add_argument(
        "--target",
        default=None,
        help="the attacker's class for every triggered image, by name or index (all-to-one)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write evaluation.md, evaluation.json and evaluation.png (ROC curve and "
        "histograms) into this directory",
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="flag when p < alpha (default: the manifest's)"
    )
    p.add_argument(
        "--strip-pool",
        type=Path,
        default=None,
        help="also run STRIP, the runtime detector usually compared with, on the same inputs: "
        "clean images (same formats; at least 65) that every input is blended with and that "
        "STRIP's threshold is set on; never the --clean images (e.g. the calibration set)",
    )
    p.add_argument("--strip-seed", type=int, default=0, help="of STRIP's draws from the pool")
    p.add_argument(
        "--strip-limit",
        type=int,
        default=STRIP_LIMIT,
        help="STRIP scores at most this many clean and this many triggered inputs, drawn at "
        f"random when there are more (default {STRIP_LIMIT}; each costs {BLENDS + 1} passes)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    return p


def run(args: argparse.Namespace) -> int:
    """Returns the exit status; bad input is one line on stderr and status 2."""
    from guard.artifact import ArtifactError, load_artifact
    from guard.engine import EngineError

    try:
        if args.batch_size < 1:
            raise CalibrationError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.threads < 0:
            raise CalibrationError(f"--threads must be 0 or more, got {args.threads}")
        if args.strip_limit < 1:
            raise CalibrationError(f"--strip-limit must be at least 1, got {args.strip_limit}")
        if args.alpha is not None and not 0.0 < args.alpha < 1.0:
            raise CalibrationError(f"--alpha must be in (0, 1), got {args.alpha}")
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise CalibrationError(f"--out {args.out} exists and is not a directory")
        if args.out is not None:  # evaluation.png: fail before the evaluation, not after it
            importlib.import_module("matplotlib")
        if args.strip_pool is not None and _same_file(args.strip_pool, args.clean):
            raise CalibrationError(
                "--strip-pool must not be the --clean images: STRIP's threshold would be set "
                "on the images it is scored on"
            )
        art = load_artifact(args.artifact)
        result, scores = evaluate(
            art, args.clean, args.triggered, args.target, args.device, args.threads,
            args.batch_size, args.alpha, args.strip_pool, args.strip_seed, args.strip_limit,
        )  # fmt: skip
    except (CalibrationError, ArtifactError, EngineError) as exc:
        print(f"mmguard evaluate: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a serving-only install: Pillow or matplotlib is missing
        print(
            f"mmguard evaluate: error: {exc}; install mmguard[calibrate] for Pillow and matplotlib",
            file=sys.stderr,
        )
        return 2
    text = markdown(result)
    print(text)
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "evaluation.md").write_text(text + "\n")
            (args.out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
            plot(scores, args.out / "evaluation.png")
        except OSError as exc:
            print(f"mmguard evaluate: error: cannot write to {args.out}: {exc}", file=sys.stderr)
            return 2
        print(f"\nwrote {args.out / 'evaluation.md'}, evaluation.json and evaluation.png")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _load(path: Path, art: Any, what: str) -> Any:
    from calibrate.dataset import load_labelled_images

    h, w = art.input.shape[1:]
    images = load_labelled_images(
        path, class_names=art.class_names, image_size=(h, w), what=what, every_class=False
    )
    if images.images.shape[1:] != tuple(art.input.shape):
        raise CalibrationError(
            f"{what} {path}: images are {list(images.images.shape[1:])} (CHW) but the artifact "
            f"takes {list(art.input.shape)}"
        )
    return images


def attacker_labels(path: Path, target: str | None, class_names: tuple[str, ...], n: int) -> Any:
    """The attacker's class per triggered image: `target` (a class name or index) for all,
    else the .npz's `target_labels`."""
    if target is not None:
        if target in class_names:
            k = class_names.index(target)
        elif target.lstrip("-").isdigit():
            k = int(target)
            if not 0 <= k < len(class_names):
                raise CalibrationError(
                    f"--target {target}: the artifact has classes 0..{len(class_names) - 1}"
                )
        else:
            raise CalibrationError(
                f"--target {target!r} is neither a class index nor one of the artifact's "
                f"classes {list(class_names)}"
            )
        return np.full(n, k, dtype=np.int64)
    stored = None
    if path.suffix.lower() == ".npz" and zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "target_labels" in npz.files:
                    stored = npz["target_labels"]
        except (ValueError, OSError, zipfile.BadZipFile) as exc:  # e.g. an object array
            raise CalibrationError(f"cannot read target_labels from {path}: {exc}") from None
    if stored is None:
        raise CalibrationError(
            "say which class the attacker wants: --target CLASS (all-to-one), or an array "
            f"`target_labels` in the triggered .npz {path}"
        )
    if stored.dtype == np.bool_ or not np.issubdtype(stored.dtype, np.integer):
        raise CalibrationError(f"{path}: target_labels must be integers, got {stored.dtype}")
    if stored.shape != (n,):
        raise CalibrationError(
            f"{path}: target_labels has shape {list(stored.shape)}, expected [{n}] (one per image)"
        )
    if stored.min() < 0 or stored.max() >= len(class_names):
        raise CalibrationError(
            f"{path}: target_labels must be in 0..{len(class_names) - 1}, got {stored.min()}"
            f"..{stored.max()}"
        )
    return stored.astype(np.int64)


def _outputs(engine: Any, x: np.ndarray, batch: int) -> list[np.ndarray | None]:
    """The engine's outputs (original, bounded, start, ratios) over x, batch by batch."""
    parts = [engine.logits(x[i : i + batch]) for i in range(0, len(x), batch)]
    return [
        None if parts[0][j] is None else np.concatenate([p[j] for p in parts]) for j in range(4)
    ]


def evaluate(
    art: Any,
    clean_path: Path,
    trig_path: Path,
    target: str | None,
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = DEFAULT_BATCH,
    alpha: float | None = None,
    strip_pool: Path | None = None,
    strip_seed: int = 0,
    strip_limit: int = STRIP_LIMIT,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures (as evaluation.json holds them) and the per-input scores behind the plot;
    `alpha` replaces the manifest's level, as `mmguard serve --alpha` does. With `strip_pool`,
    STRIP's figures too (`strip_figures`)."""
    from calibrate.scoring import attack_figures, auroc, suspicion, undefended_figures
    from guard.engine import GuardEngine
    from guard.mmdf import DecisionRule, decide, statistic

    clean = _load(clean_path, art, "clean test set")
    trig = _load(trig_path, art, "triggered test set")
    attacker = attacker_labels(trig_path, target, art.class_names, len(trig.labels))
    keep = trig.labels != attacker
    if not keep.any():
        raise CalibrationError(
            f"every triggered image in {trig_path} already has the attacker's class as its true "
            "label: nothing to measure the attack on"
        )
    tx, ty, attacker = trig.images[keep], trig.labels[keep], attacker[keep]
    pool = None if strip_pool is None else _load(strip_pool, art, "STRIP pool").images
    if pool is not None and len(pool) < STRIP_POOL_MIN:
        raise CalibrationError(
            f"STRIP pool {strip_pool} has {len(pool)} images; it needs at least "
            f"{STRIP_POOL_MIN} (each of its images is blended with {STRIP_POOL_MIN - 1} others)"
        )
    engine = GuardEngine(art, device, threads)
    g, gz, gs, gr = _outputs(engine, clean.images, batch_size)
    tg, tgz, tgs, tgr = _outputs(engine, tx, batch_size)
    assert g is not None and gz is not None and tg is not None and tgz is not None
    alpha = art.rule.alpha if alpha is None else alpha
    rules: dict[str, Any] = {}
    p_clean = p_trig = None
    for tag, dis in (("p", False), ("p_dis", True)):
        rule = DecisionRule(alpha, flag_on_disagreement=dis)
        dc = decide(g, gz, art.null, rule, art.start_detector(gs), art.range_detector(gr))
        dt = decide(tg, tgz, art.null, rule, art.start_detector(tgs), art.range_detector(tgr))
        rules[tag] = attack_figures(dc, clean.labels, dt, ty, attacker)
        p_clean, p_trig = dc.p_value, dt.p_value
    assert p_clean is not None and p_trig is not None
    d_clean, d_trig = statistic(g, gz), statistic(tg, tgz)
    targets = np.unique(attacker)
    result = {
        "artifact": str(art.root),
        "model": art.name,
        "clean_images": len(clean.labels),
        "triggered_images": len(ty),
        "triggered_left_out": int((~keep).sum()),
        "attacker_classes": [art.class_names[k] for k in targets.tolist()],
        "alpha": alpha,
        "detectors": ["learned bounds"]
        + (["start bounds"] if art.start_null is not None else [])
        + (["activation range"] if art.range_null is not None else []),
        "forward_passes_per_input": 3 if art.start_null is not None else 2,
        "device": engine.device,
        "providers": engine.providers,
        "undefended": undefended_figures(g.argmax(1), clean.labels, tg.argmax(1), ty, attacker),
        "guarded": rules["p"],
        "guarded_with_disagreement": rules["p_dis"],
        "auroc_p_value": auroc(suspicion(p_clean), suspicion(p_trig)),
        "auroc_learned_statistic": auroc(d_clean, d_trig),
    }
    scores = {
        "alpha": alpha,
        "p_clean": p_clean,
        "p_trig": p_trig,
        "d_clean": d_clean,
        "d_trig": d_trig,
    }
    if pool is not None:
        result["strip"], h_clean, h_trig = strip_figures(
            engine, pool, clean.images, tx, tg.argmax(1) == attacker, alpha, strip_seed,
            batch_size, strip_limit,
        )  # fmt: skip
        scores["strip_clean"], scores["strip_trig"] = -h_clean, -h_trig  # higher: suspicious
    return result, scores


def strip_figures(
    engine: Any,
    pool: np.ndarray,
    x: np.ndarray,
    tx: np.ndarray,
    reach: np.ndarray,
    alpha: float,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    limit: int = STRIP_LIMIT,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """STRIP on the clean images `x` and the triggered `tx` (`reach`: where the original network
    gives the attacker's class, as `evaluate` already computed it), with the original network
    alone: each input blended with `strip.BLENDS` pool
    images; flagged when its entropy is below the threshold that flags a fraction `alpha` of
    the pool's own (each pool image blended with the others). STRIP corrects nothing: its attack
    success counts triggered inputs it lets through that reach the attacker's class. At most
    `limit` clean and `limit` triggered inputs are scored (a seeded random subset of each when
    there are more). Returns the figures and the clean and triggered entropies."""
    from calibrate import strip
    from calibrate.scoring import auroc

    def logits(b: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [engine.original_logits(b[i : i + batch_size]) for i in range(0, len(b), batch_size)]
        )

    rng = np.random.default_rng(seed)
    if len(x) > limit:
        x = x[np.sort(rng.choice(len(x), limit, replace=False))]
    if len(tx) > limit:
        keep = np.sort(rng.choice(len(tx), limit, replace=False))
        tx, reach = tx[keep], reach[keep]
    h_pool = strip.strip_scores(logits, pool, pool, rng, exclude_self=True)
    threshold = strip.low_tail_threshold(h_pool, alpha)
    h_clean = strip.strip_scores(logits, x, pool, rng)
    h_trig = strip.strip_scores(logits, tx, pool, rng)
    flagged_trig = h_trig < threshold
    figures = {
        "pool_images": len(pool),
        "clean_scored": len(x),
        "triggered_scored": len(tx),
        "blends": strip.BLENDS,
        "threshold_entropy_bits": threshold,
        "fpr": float(np.mean(h_clean < threshold)),
        "tpr": float(np.mean(flagged_trig)),
        "asr_flagged_rejected": float(np.mean(reach & ~flagged_trig)),
        "auroc": auroc(-h_clean, -h_trig),
        "forward_passes_per_input": 1 + strip.BLENDS,
    }
    return figures, h_clean, h_trig


def markdown(r: dict[str, Any]) -> str:
    u, p, q = r["undefended"], r["guarded"], r["guarded_with_disagreement"]

    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    target = ", ".join(r["attacker_classes"])
    rows = [
        ("clean accuracy", pct(u["clean_accuracy"]), pct(p["clean_accuracy"]),
         pct(q["clean_accuracy"])),
        ("clean inputs flagged (false-positive rate)", "-", pct(p["fpr"]), pct(q["fpr"])),
        (f"attack success (-> {target})", pct(u["asr"]), pct(p["asr"]), pct(q["asr"])),
        ("triggered inputs restored to their true class", pct(u["restored"]),
         pct(p["restored"]), pct(q["restored"])),
        ("triggered inputs flagged (true-positive rate)", "-", pct(p["tpr"]), pct(q["tpr"])),
    ]  # fmt: skip
    left_out = (
        f" ({r['triggered_left_out']} triggered images of the attacker's own class left out)"
        if r["triggered_left_out"]
        else ""
    )
    lines = [
        f"# {r['model']}: {r['clean_images']} clean and {r['triggered_images']} triggered test "
        f"images{left_out}",
        "",
        f"| | undefended | guarded (p < {r['alpha']:g}) | guarded, and on disagreement |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        f"- AUROC of the guard's p-value, clean against triggered: {r['auroc_p_value']:.4f} "
        f"(the learned bounds' statistic alone: {r['auroc_learned_statistic']:.4f})",
        f"- detectors: {', '.join(r['detectors'])}; {r['forward_passes_per_input']} forward "
        f"passes per input; ran on {r['device']} ({r['providers'][0]})",
    ]
    if "strip" in r:
        st = r["strip"]
        lines += [
            "",
            f"## Beside STRIP ({st['blends']} blends per input with {st['pool_images']} pool "
            f"images; threshold {st['threshold_entropy_bits']:.4f} bits, set on the pool to flag "
            f"{r['alpha']:g} of it; STRIP scored on {st['clean_scored']} clean and "
            f"{st['triggered_scored']} triggered inputs)",
            "",
            "| | guard | STRIP |",
            "|---|---|---|",
            f"| clean inputs flagged | {pct(p['fpr'])} | {pct(st['fpr'])} |",
            f"| triggered inputs flagged | {pct(p['tpr'])} | {pct(st['tpr'])} |",
            f"| attack success (the guard corrects flagged inputs; STRIP rejects them) | "
            f"{pct(p['asr'])} | {pct(st['asr_flagged_rejected'])} |",
            f"| AUROC, clean against triggered | {r['auroc_p_value']:.4f} | {st['auroc']:.4f} |",
            f"| forward passes per input | {r['forward_passes_per_input']} | "
            f"{st['forward_passes_per_input']} |",
        ]
    return "\n".join(lines)


def plot(scores: dict[str, Any], path: Path) -> None:
    """ROC curves (the guard's p-value, the learned statistic, and STRIP's entropy when it ran)
    and the clean and triggered histograms of -log10 p, with the level alpha the guard flags
    below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibrate.scoring import auroc, roc_curve, suspicion

    s_clean, s_trig = suspicion(scores["p_clean"]), suspicion(scores["p_trig"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    curves = [("p-value", s_clean, s_trig), ("learned statistic d", scores["d_clean"],
              scores["d_trig"])]  # fmt: skip
    if "strip_clean" in scores:
        curves.append(("STRIP entropy", scores["strip_clean"], scores["strip_trig"]))
    for label, neg, pos in curves:
        fpr, tpr = roc_curve(neg, pos)
        ax1.plot(fpr, tpr, label=f"{label} (AUROC {auroc(neg, pos):.3f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax1.legend(loc="lower right", fontsize=8)
    finite = np.concatenate([s_clean, s_trig])
    top = float(finite[np.isfinite(finite)].max(initial=1.0))
    bins = np.linspace(0.0, top, 40)
    ax2.hist(np.minimum(s_clean, top), bins=bins, alpha=0.6, density=True, label="clean")
    ax2.hist(np.minimum(s_trig, top), bins=bins, alpha=0.6, density=True, label="triggered")
    ax2.axvline(-np.log10(scores["alpha"]), color="black", ls="--", lw=1, label="alpha")
    ax2.set(xlabel="-log10 p (p = 0 drawn at the right edge)", ylabel="density")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
