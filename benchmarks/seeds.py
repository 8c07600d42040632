"""How much a model's guard depends on its calibration: calibrate it once per seed and score each.

Run from the repository root::

    .venv/bin/python -m benchmarks.seeds run wanet_e24 --seeds 1-3
    .venv/bin/python -m benchmarks.seeds run wanet_w64_e90 --seeds 2-7 --device cuda
    .venv/bin/python -m benchmarks.seeds add wanet_w64_e90 --scored-variant seed1
    .venv/bin/python -m benchmarks.seeds table wanet_e24 wanet_w64_e90

``--seed`` is ``mmguard calibrate``'s: it draws the split of the clean calibration images into
learning and held-out ones and the ascents' random starts, so each seed is a calibration a user
could equally have run. ``run`` calibrates the model with ``mmguard calibrate``'s defaults (plus
``--calibrate-args``) once per seed, on ``--device``, and scores each artifact as
``benchmarks.evaluate`` does, without STRIP: the guard's figures over the 9,000 clean evaluation
images and their triggered copies, served (today's default) and with the learned statistic
alone. Each draw is appended as one JSON line to ``CACHE/eval/NAME/seeds.jsonl`` (a run
elsewhere, e.g. on a GPU machine, adds its lines to the same file); ``table`` prints every
draw and the spread (min, median, max) per model. ``--variant V`` keeps the draws of a
calibration variant (``--calibrate-args``) apart: ``seeds-V.jsonl``. ``add`` records a default
calibration that ``benchmarks.evaluate run`` already scored (its results file and report,
``--scored-variant``) as a draw.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluate import (
    REPO_ROOT,
    THREADS,
    calibrate,
    guard_figures,
    guard_logits,
    split_test,
    variant_problem,
)
from benchmarks.train_models import IMBALANCED, model_name, model_paths, parse_name


def parse_seeds(text: str) -> list[int]:
    """``"1-3,7"`` -> [1, 2, 3, 7]: comma-separated seeds or inclusive ranges, each >= 0."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(f"--seeds {text!r}: expected seeds or ranges such as 1-3,7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--seeds {text!r}: the range {lo}-{hi} runs backwards")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def report_facts(report: dict[str, Any]) -> dict[str, Any]:
    """What a calibration's report says of it: seed, device, iterations, MM-BD, held-out."""
    mmbd = report.get("mmbd", {})
    return {
        "seed": report["split"]["seed"],
        "device": report.get("device", "cpu"),  # reports from before --device ran on the CPU
        "iterations": report["iterations"],
        "timing_s": report.get("timing_s"),
        "mmbd": {k: mmbd[k] for k in ("suspected", "target", "p_value") if k in mmbd},
        "heldout": report["heldout"],
        "range_detector": report.get("range_detector") is not None,
    }


def draw_record(
    name: str, art_dir: Path, data: dict[str, np.ndarray], idx: tuple[np.ndarray, ...]
) -> dict[str, Any]:
    """One calibration's figures: the report's facts and the guard's, served and learned alone."""
    s = guard_logits(name, art_dir, data, idx)
    alpha = s.art.rule.alpha
    return {
        "model": name,
        **report_facts(json.loads((art_dir / "report.json").read_text())),
        "undefended_clean_accuracy": float(np.mean(s.g.argmax(1) == s.y)),
        "undefended_asr": float(np.mean(s.tg.argmax(1) == s.attacker)),
        "learned_alone": guard_figures(
            s.g, s.gz, s.y, s.tg, s.tgz, s.ty, s.attacker, s.art.null, alpha
        ),
        "served": guard_figures(
            s.g, s.gz, s.y, s.tg, s.tgz, s.ty, s.attacker, s.art.null, alpha, s.extras()
        ),
    }


def non_default(calibrate_args: str) -> list[str]:
    """The configuration fields ``mmguard calibrate CALIBRATE_ARGS`` sets away from its
    defaults, other than the seed (and the range detector required, which the default turns
    on wherever it fits)."""
    from benchmarks.calibrating import calibration_config

    default = dataclasses.asdict(calibration_config([]))
    given = dataclasses.asdict(calibration_config(shlex.split(calibrate_args)))
    given["seed"] = default["seed"]
    if given["range_detector"]:
        given["range_detector"] = default["range_detector"]
    return sorted(k for k in default if given[k] != default[k])


def record_from_results(name: str, cache_dir: Path, variant: str) -> dict[str, Any]:
    """A draw from a ``benchmarks.evaluate run`` of NAME (``--variant``): the same figures, as
    that command scored them (its STRIP part left out). Only a default calibration (with any
    seed) is a draw."""
    suffix = f"-{variant}" if variant else ""
    out = cache_dir / "eval" / name
    results_path, report_path = out / f"results{suffix}.json", out / f"artifact{suffix}/report.json"
    for path in (results_path, report_path):
        if not path.exists():
            raise SystemExit(f"{name}{suffix}: no {path}; score it with benchmarks.evaluate run")
    results = json.loads(results_path.read_text())
    report = json.loads(report_path.read_text())
    calibrate_args = results.get("variant", {}).get("calibrate_args", "")
    changed = non_default(calibrate_args)
    if changed:
        raise SystemExit(f"{name}{suffix}: not a default calibration ({', '.join(changed)})")
    if "learned_statistic_alone" not in results:
        raise SystemExit(f"{name}{suffix}: scored without the range detector; not a default draw")
    return {
        "model": name,
        **report_facts(report),
        "undefended_clean_accuracy": results["undefended_clean_accuracy"],
        "undefended_asr": results["undefended_asr"],
        "learned_alone": {k: results["learned_statistic_alone"][k] for k in ("p", "p_dis")},
        "served": {"p": results["p"], "p_dis": results["p_dis"]},
        "calibrate_seconds": results.get("calibrate_seconds"),
        "calibrate_args": calibrate_args,
        "source": f"benchmarks.evaluate run {name}" + (f" --variant {variant}" if variant else ""),
    }


def draws_path(cache_dir: Path, name: str, variant: str = "") -> Path:
    return cache_dir / "eval" / name / (f"seeds-{variant}.jsonl" if variant else "seeds.jsonl")


def read_draws(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64) * 100
    return f"{v.min():.2f} / {np.median(v):.2f} / {v.max():.2f}"


def table(names: list[str], cache_dir: Path, variant: str = "") -> str:
    """Markdown: one row per draw (by seed, then device), then the spread per model."""
    lines = [
        "| model | seed | device | iterations "
        "| served: guarded ASR / clean FPR / guarded clean acc "
        "| restored / TPR | learned statistic alone: guarded ASR / clean FPR "
        "| disagreement rule: ASR / clean flag rate | MM-BD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summaries = []
    for name in names:
        path = draws_path(cache_dir, name, variant)
        draws = sorted(
            read_draws(path),
            key=lambda d: (d["seed"], str(d.get("device"))),
        )
        if not draws:
            summaries.append(f"- {name}: no draws in {path}")
            continue
        for d in draws:
            p, dis, alone = d["served"]["p"], d["served"]["p_dis"], d["learned_alone"]["p"]
            mmbd = d.get("mmbd", {})
            verdict = (
                f"class {mmbd.get('target')} (p={mmbd['p_value']:.2g})"
                if "p_value" in mmbd
                else "-"
            )
            lines.append(
                f"| {name} | {d['seed']} | {d.get('device')} | {d['iterations']} "
                f"| {100 * p['asr']:.2f} / {100 * p['fpr']:.2f} / {100 * p['clean_accuracy']:.2f} "
                f"| {100 * p['restored']:.2f} / {100 * p['tpr']:.2f} "
                f"| {100 * alone['asr']:.2f} / {100 * alone['fpr']:.2f} "
                f"| {100 * dis['asr']:.2f} / {100 * dis['fpr']:.2f} | {verdict} |"
            )
        asr = [d["served"]["p"]["asr"] for d in draws]
        summaries.append(
            f"- {name}: {len(draws)} draws; guarded ASR min / median / max "
            f"{spread(asr)}, at or under 2% in {sum(a <= 0.02 for a in asr)}; clean FPR "
            f"{spread([d['served']['p']['fpr'] for d in draws])}; learned statistic alone "
            f"{spread([d['learned_alone']['p']['asr'] for d in draws])}; undefended ASR "
            f"{100 * draws[0]['undefended_asr']:.2f}, clean accuracy "
            f"{100 * draws[0]['undefended_clean_accuracy']:.2f}"
        )
    return "\n".join([*lines, "", *summaries])


def run(name: str, seeds: list[int], args: argparse.Namespace) -> None:
    from benchmarks.cifar import load_cifar10
    from calibrate.cifar_resnet import DEFAULT_WIDTH

    weights, record_path = model_paths(args.cache_dir, name)
    if not weights.exists():
        raise SystemExit(f"{name}: no trained model at {weights}")
    if parse_name(name)[0] in IMBALANCED:
        raise SystemExit(f"{name}: an MMOM model has no attack to score")
    width = int(json.loads(record_path.read_text()).get("width", DEFAULT_WIDTH))
    path = draws_path(args.cache_dir, name, args.variant)
    kind = args.device.split(":")[0]
    drawn = {d["seed"] for d in read_draws(path) if str(d.get("device")).startswith(kind)}
    todo = [seed for seed in seeds if seed not in drawn]
    for seed in sorted(set(seeds) & drawn):
        print(
            f"{name}: seed {seed} on {kind} is already a draw in {path}; skipped "
            "(remove its line to draw it again)",
            file=sys.stderr,
        )
    if not todo:
        return
    calib_npz = args.cache_dir / "eval" / "calib.npz"
    if not calib_npz.exists():
        raise SystemExit(f"no {calib_npz}: `benchmarks.evaluate run` writes it")
    data = load_cifar10(args.data, args.cache_dir)
    idx = split_test(data["y_test"])
    out = args.cache_dir / "eval" / name
    extra = shlex.split(args.calibrate_args)
    for seed in todo:
        art_dir = out / (f"seeds-{args.variant}" if args.variant else "seeds") / f"seed{seed}"
        flags = ["--seed", str(seed), "--device", args.device, *extra]
        print(f"{name}: calibrating, seed {seed} ...", file=sys.stderr, flush=True)
        seconds = calibrate(weights, calib_npz, art_dir, name, "mmac", flags, width)
        record = draw_record(name, art_dir, data, idx)
        record["calibrate_seconds"] = round(seconds, 1)
        record["calibrate_args"] = args.calibrate_args
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        p = record["served"]["p"]
        print(
            f"{name} seed {seed}: guarded ASR {100 * p['asr']:.2f}%, clean FPR "
            f"{100 * p['fpr']:.2f}%",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="calibrate once per seed and score each")
    r.add_argument("names", nargs="+", type=model_name)
    r.add_argument("--seeds", required=True, help="e.g. 1-3 or 0,4,7")
    r.add_argument("--device", default="cpu", help="mmguard calibrate --device (default cpu)")
    r.add_argument("--calibrate-args", default="", help="extra mmguard calibrate flags")
    r.add_argument("--variant", default="", help="keep these draws apart (with --calibrate-args)")
    r.add_argument("--threads", type=int, default=THREADS[0], help="torch and onnxruntime")
    r.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    a = sub.add_parser("add", help="record a benchmarks.evaluate calibration as a draw")
    a.add_argument("names", nargs="+", type=model_name)
    a.add_argument("--scored-variant", default="", help="benchmarks.evaluate run's --variant")
    t = sub.add_parser("table", help="print every draw and the spread per model")
    t.add_argument("names", nargs="+", type=model_name)
    t.add_argument("--variant", default="", help="the draws of this variant")
    for p in (r, a, t):
        p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(table(args.names, args.cache_dir, args.variant))
        return 0
    if args.cmd == "add":
        for name in args.names:
            path = draws_path(args.cache_dir, name)
            record = record_from_results(name, args.cache_dir, args.scored_variant)
            if any(d.get("source") == record["source"] for d in read_draws(path)):
                print(f"{name}: {record['source']} is already a draw", file=sys.stderr)
                continue
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        print(table(args.names, args.cache_dir))
        return 0
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if variant_problem(args.variant):
        parser.error(variant_problem(args.variant))
    if args.calibrate_args and not args.variant:
        parser.error("--calibrate-args needs --variant, so that its draws stay apart")
    if args.device == "auto":
        parser.error("--device auto: name the device (cpu, cuda, cuda:N), as each draw records it")
    taken = {"--seed", "--device"} & {f.split("=")[0] for f in shlex.split(args.calibrate_args)}
    if taken:
        parser.error(f"--calibrate-args: {', '.join(sorted(taken))} is this command's own option")
    import torch

    THREADS[0] = max(args.threads, 1)
    torch.set_num_threads(THREADS[0])
    for name in args.names:
        run(name, seeds, args)
    print(table(args.names, args.cache_dir, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
