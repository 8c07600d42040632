"""`mmguard demo`: the whole job, end to end, on the embedded backdoored CIFAR-10 model.

1. `mmguard calibrate` on the shipped model and its clean calibration set (50 images per class),
   with the defaults but for MM-BD's ascent (DEMO_MMBD_STEPS steps, not 300, so that the demo
   ends within a few minutes on a laptop CPU; it says so);
2. `mmguard serve` on the artifact, as a child process on free loopback ports;
3. the shipped clean and triggered test images sent through stock `tritonclient.grpc`;
4. a table of what the guard did (flag rates, accuracy, attack success before and after), where
   the metrics are, and a clean shutdown (SIGTERM, graceful drain, exit status 0).

The example lives in ``calibrate/examples/cifar10`` and is rebuilt from the real CIFAR-10 by
``benchmarks/make_demo.py``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.errors import CalibrationError

EXAMPLE = Path(__file__).resolve().parent / "examples" / "cifar10"
BATCH = 32
DEMO_MMBD_STEPS = 100  # `mmguard calibrate` default: 300 (a BadNets target stands out at 100)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="calibrate, serve and query the embedded backdoored CIFAR-10 example",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--example", type=Path, default=EXAMPLE, help="example directory")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="artifact directory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyError as exc:
        print(f"mmguard demo: error: the example lacks the field or array {exc}", file=sys.stderr)
    except (CalibrationError, OSError, ValueError) as exc:  # bad example files, JSON included
        print(f"mmguard demo: error: {exc}", file=sys.stderr)
    except (RuntimeError, TimeoutError) as exc:  # the server did not start: its log says why
        print(f"mmguard demo: error: the guard server failed: {exc}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from calibrate.cli import set_up_torch_threads, summary

    set_up_torch_threads(args.threads)  # before torch is imported
    from calibrate.config import CalibrationConfig
    from calibrate.modelsrc import ModelSource
    from calibrate.pipeline import CalibrationJob, run_calibration

    example = args.example
    meta_path = example / "example.json"
    if not meta_path.is_file():
        raise CalibrationError(f"{meta_path} is missing: not an example directory")
    meta = json.loads(meta_path.read_text())
    print(
        f"[1/4] calibrating {meta['description']} (MM-BD ascent shortened to "
        f"{DEMO_MMBD_STEPS} steps for the demo; `mmguard calibrate` runs 300) ...",
        flush=True,
    )
    t0 = time.perf_counter()
    outcome = run_calibration(
        CalibrationJob(
            model=ModelSource(factory=meta["factory"], weights=example / "model.pt"),
            data=example / "clean.npz",
            out=args.out,
            name=meta["name"],
            config=CalibrationConfig(mmbd_steps=DEMO_MMBD_STEPS),
            force=True,
        )
    )
    print(summary(outcome.report, outcome.out), flush=True)
    with np.load(example / "test.npz", allow_pickle=False) as npz:
        test = {k: npz[k] for k in npz.files}
    return _serve_and_query(args.out, meta, test, time.perf_counter() - t0)


def _serve_and_query(
    artifact: Path, meta: dict[str, Any], test: dict[str, np.ndarray], calib_s: float
) -> int:
    from guard.process import GuardProcess

    print("[2/4] starting `mmguard serve` on loopback ports ...", flush=True)
    with GuardProcess(artifact, "enforce", ["--max-batch-size", str(BATCH)]) as server:
        server.wait_serving(timeout_s=120)
        print(f"      serving on {server.url} ({server.build_info().get('provider')})", flush=True)
        print("[3/4] sending the test images through tritonclient ...", flush=True)
        clean = _query(server.url, meta["name"], test["clean"])
        triggered = _query(server.url, meta["name"], test["triggered"])
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        counters = {
            s.name: s.value
            for s in server.samples()
            if s.name in ("guard_inferences_total", "guard_flagged_total") and not s.labels
        }
        print("[4/4] results\n", flush=True)
        print(_table(meta, test, clean, triggered))
        print(
            f"\nPrometheus metrics were served at {metrics_url} "
            f"(guard_inferences_total {counters.get('guard_inferences_total', 0):.0f}, "
            f"guard_flagged_total {counters.get('guard_flagged_total', 0):.0f}); "
            "`make serve` keeps the server up on :8001 with metrics on :8002, and "
            "deploy/grafana holds the dashboard."
        )
        print(f"Artifact and calibration report: {artifact}/ (report.md). ", end="")
        print("Shutting down (SIGTERM) ...", flush=True)
        server.close()
        code = server.proc.returncode
    print(f"server exited with status {code}; calibration took {calib_s:.0f} s", flush=True)
    return 0 if code == 0 else 1


def _query(url: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    import tritonclient.grpc as tc

    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    out: dict[str, list[np.ndarray]] = {"label": [], "flagged": [], "original_label": []}
    client = tc.InferenceServerClient(url)
    try:
        for i in range(0, len(x), BATCH):
            inp = tc.InferInput("input", list(x[i : i + BATCH].shape), "FP32")
            inp.set_data_from_numpy(x[i : i + BATCH])
            wanted = [tc.InferRequestedOutput(n) for n in out]
            res = client.infer(model, [inp], outputs=wanted, client_timeout=60)
            for name in out:
                out[name].append(res.as_numpy(name))
    finally:
        client.close()
    return {k: np.concatenate(v) for k, v in out.items()}


def _table(
    meta: dict[str, Any],
    test: dict[str, np.ndarray],
    clean: dict[str, np.ndarray],
    triggered: dict[str, np.ndarray],
) -> str:
    y, ty, target = test["clean_labels"], test["triggered_labels"], int(meta["target"])
    names = meta["class_names"]

    def pct(v: float) -> str:
        return f"{100 * v:6.1f}%"

    rows = [
        ("flag rate, clean inputs", "-", pct(np.mean(clean["flagged"]))),
        ("flag rate, triggered inputs", "-", pct(np.mean(triggered["flagged"]))),
        (
            "accuracy, clean inputs",
            pct(np.mean(clean["original_label"] == y)),
            pct(np.mean(clean["label"] == y)),
        ),
        (
            f"attack success (-> {names[target]})",
            pct(np.mean(triggered["original_label"] == target)),
            pct(np.mean(triggered["label"] == target)),
        ),
        (
            "triggered inputs with their true class",
            pct(np.mean(triggered["original_label"] == ty)),
            pct(np.mean(triggered["label"] == ty)),
        ),
    ]
    head = f"{len(y)} clean and {len(ty)} triggered ({meta['attack']}) test images"
    lines = [head, "", f"{'':<40}{'undefended':>12}{'guarded':>10}"]
    lines += [f"{a:<40}{b:>12}{c:>10}" for a, b, c in rows]
    return "\n".join(lines)
