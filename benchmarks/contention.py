"""Calibration on a busy CPU: torch's OpenMP threads sleeping (PASSIVE), left to OpenMP's own
default (spin a while, then sleep), or spinning (ACTIVE) while they wait.

`mmguard calibrate` and `mmguard demo` set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it
(``calibrate.cli.set_up_torch_threads``). This benchmark measures that choice: it runs a
shortened calibration of the embedded demo model (MM-BD 30 steps, 6 iterations) as a
subprocess, with torch's default threads (one per core), under each wait policy, on an idle
machine and with ``--hogs`` other processes (default 1) each spinning a core, interleaved round
by round.

It prints each run's wall time, the median per condition, and each policy's median as a ratio
to PASSIVE's under the same load, side by side from one run. Run from the repository root:
``.venv/bin/python -m benchmarks.contention [--rounds 3]``. Needs nothing beyond the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "calibrate" / "examples" / "cifar10"
SHORT = ["--mmbd-steps", "30", "--max-iters", "6", "--min-iters", "0", "--overtime-iters", "0"]
HOG = "while True:\n    pass\n"
POLICIES = ("PASSIVE", "default", "ACTIVE")  # "default": OMP_WAIT_POLICY unset


# `mmguard` as a user runs it, except that torch is imported first: then
# calibrate.cli.set_up_torch_threads leaves OMP_WAIT_POLICY alone, so an unset one stays unset
# and OpenMP's own default is what the "default" runs measure.
MMGUARD = "import sys, torch\nfrom guard.cli import main\nsys.exit(main(sys.argv[1:]))"


def calibrate_once(out: Path, policy: str) -> float:
    """Wall seconds of one shortened `mmguard calibrate` of the demo model with
    OMP_WAIT_POLICY=``policy`` ("default": unset)."""
    factory = json.loads((EXAMPLE / "example.json").read_text())["factory"]
    argv = [sys.executable, "-c", MMGUARD, "calibrate", "--factory", factory]
    argv += ["--weights", str(EXAMPLE / "model.pt"), "--data", str(EXAMPLE / "clean.npz")]
    argv += ["--out", str(out), "--force", "--quiet", *SHORT]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"calibration failed ({policy}):\n{proc.stderr}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per condition")
    parser.add_argument("--hogs", type=int, default=1, help="busy-looping processes when busy")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.hogs} busy-looping process(es) in the busy runs")
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for load in ("idle", "busy"):
                hogs = []
                if load == "busy":
                    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
                    time.sleep(1.0)
                try:
                    for policy in POLICIES:
                        s = calibrate_once(Path(tmp) / "out", policy)
                        times.setdefault((load, policy), []).append(s)
                        print(f"round {r + 1}: {load:4s} {policy:7s} {s:6.1f} s", flush=True)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nmedian wall seconds of the shortened demo calibration, and the ratio to PASSIVE")
    print(
        "load  "
        + "".join(f"{p:>10s}" for p in POLICIES)
        + "".join(f"{p + '/P':>12s}" for p in POLICIES[1:])
    )
    for load in ("idle", "busy"):
        row = "".join(f"{med[(load, p)]:10.1f}" for p in POLICIES)
        ratios = "".join(f"{med[(load, p)] / med[(load, 'PASSIVE')]:12.2f}" for p in POLICIES[1:])
        print(f"{load:5s} {row}{ratios}")
    for p in POLICIES:
        print(f"busy/idle, {p}: {med[('busy', p)] / med[('idle', p)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
