"""MM-BD's verdict on the evaluation models with the ascent of today's defaults, next to the one in
each model's calibration report (the default of the day it was calibrated).

    python -m benchmarks.mmbd_steps wanet_e24 all2all_w64_e60 ...

For each model: the per-class maximum margins r_k of the original network (SPEC 5: 30 uniform
starts per class, the same starts `mmguard calibrate` draws), the suspected class and p-value, from
the report (CACHE/eval/NAME/artifact/report.json) and recomputed with `CalibrationConfig()`'s MM-BD
settings. Needs the cached weights (benchmarks.train_models) and a calibrated artifact
(benchmarks.evaluate run). Prints a markdown table and writes CACHE/eval/NAME/mmbd-STEPS.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.train_models import model_name, model_paths, parse_name

REPO_ROOT = Path(__file__).resolve().parents[1]


def recheck(cache_dir: Path, name: str) -> dict[str, Any]:
    """MM-BD with today's defaults on a cached model; its report's MM-BD beside it."""
    from benchmarks.calibrating import factory_for
    from calibrate.config import CalibrationConfig
    from calibrate.mmbd import verdict
    from calibrate.modelsrc import ModelSource, load_model
    from calibrate.pipeline import original_maxima

    weights, record_path = model_paths(cache_dir, name)
    record = json.loads(record_path.read_text())
    report = json.loads((cache_dir / "eval" / name / "artifact" / "report.json").read_text())
    old = report["config"]
    width = parse_name(name).width or record["width"]
    model = load_model(ModelSource(factory=factory_for(width), weights=weights), 10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # the calibration's own MM-BD, with today's settings and the seed and J it was calibrated with
    cfg = dataclasses.replace(CalibrationConfig(), seed=old["seed"])
    per_class = old["starts_per_class"] or min(report["split"]["learn_per_class"])
    t = time.perf_counter()
    r, _ = original_maxima(model, 10, per_class, (3, 32, 32), cfg, quiet=True)
    seconds = time.perf_counter() - t
    now = verdict(r, cfg.mmbd_alpha)
    result = {
        "name": name,
        "attacked_class": record.get("target"),
        "report": {"steps": old["mmbd_steps"], **report["mmbd"]},
        "now": {"steps": cfg.mmbd_steps, **now.to_dict()},
        "seconds": round(seconds, 1),
    }
    out = cache_dir / "eval" / name / f"mmbd-{cfg.mmbd_steps}.json"
    out.write_text(json.dumps(result, indent=1))
    return result


def _verdict(v: dict[str, Any]) -> str:
    what = f"backdoor, class {v['target']}" if v["suspected"] else "clean"
    return f"{what} (p={v['p_value']:.2g})"


def _margins(v: dict[str, Any]) -> str:
    return " ".join(f"{x:.1f}" for x in v["r"])


def row(res: dict[str, Any]) -> str:
    rep, now = res["report"], res["now"]
    attacked = "-" if res["attacked_class"] is None else str(res["attacked_class"])
    return (
        f"| {res['name']} | {attacked} | {_verdict(rep)} | {_margins(rep)} | {_verdict(now)} | "
        f"{_margins(now)} | {res['seconds']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", type=model_name)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    args = parser.parse_args(argv)
    missing = [
        n
        for n in args.names
        if not (args.cache_dir / "eval" / n / "artifact" / "report.json").is_file()
        or not model_paths(args.cache_dir, n)[0].is_file()
    ]
    if missing:
        parser.error(f"no cached model or calibration report for {', '.join(missing)}")
    from calibrate.config import CalibrationConfig

    steps = CalibrationConfig().mmbd_steps
    print(
        f"| model | attacked class | MM-BD in the report | r_k (report) | MM-BD, {steps} steps | "
        f"r_k ({steps} steps) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        print(row(recheck(args.cache_dir, name)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
