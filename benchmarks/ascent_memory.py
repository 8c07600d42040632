"""Memory and time of MM-BD's margin ascent on a many-class model, in one batch or in chunks.

MM-BD ascends 30 random starts per class (SPEC 5), so the points grow with the number of classes:
3,000 for a 100-class model. Before stop 28 they went through the network as one batch, whose
saved activations made the peak memory grow with K; the ascent now runs its forward/backward
passes in chunks of ``--batch-size`` (256 by default) and accumulates the gradients before each
step. This benchmark runs both ways on the same random starts of a CIFAR ResNet-18 (random
weights: memory and time do not depend on them), each in a child process of its own, in
alternating order, and prints the peak resident memory each added over what it held before the
ascent, the seconds per step and the ratios (chunked / one batch), and the largest difference
between the two runs' final margins.

Run from the repository root::

    .venv/bin/python -m benchmarks.ascent_memory [--classes 100] [--width 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rss_kib() -> int:
    """The current resident set size (ru_maxrss is a peak, this is now)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() // 1024


def child(classes: int, width: int, starts: int, steps: int, batch: int, out: Path) -> None:
    """One ascent; writes its figures and final margins to `out` (.npz)."""
    import torch

    from calibrate.ascent import AscentSettings, maximize_margins, random_starts
    from calibrate.cifar_resnet import cifar_resnet18

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = cifar_resnet18(num_classes=classes, width=width).eval().requires_grad_(False)
    x0, k = random_starts(classes, starts, (3, 32, 32), torch.Generator().manual_seed(1))
    with torch.no_grad():  # warm the allocator and oneDNN once, outside the measurement
        net(x0[:2])
    before = _rss_kib()
    t0 = time.perf_counter()
    _, m = maximize_margins(
        net, x0, k, AscentSettings(steps, 0.01), batch_size=batch if batch > 0 else None
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(out, margins=m.numpy(), added_mib=(peak - before) / 1024, seconds=seconds)


def run(args: argparse.Namespace, batch: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.ascent_memory", "--child", str(out),
           "--classes", str(args.classes), "--width", str(args.width),
           "--starts", str(args.starts), "--steps", str(args.steps),
           "--batch-size", str(batch)]  # fmt: skip
    subprocess.run(cmd, check=True)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--starts", type=int, default=30, help="per class (SPEC 5's 30)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256, help="the chunk; 0: one batch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.classes, args.width, args.starts, args.steps, args.batch_size, args.child)
        return 0
    import tempfile

    points = args.classes * args.starts
    print(
        f"CIFAR ResNet-18, width {args.width}, {args.classes} classes x {args.starts} starts = "
        f"{points} points, 32x32, {args.steps} Adam steps, one thread, {args.rounds} rounds"
    )
    ways = {"one batch": 0, f"chunks of {args.batch_size}": args.batch_size}
    got: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for name in order:
                got[name].append(run(args, ways[name], Path(tmp) / f"{r}-{ways[name]}.npz"))
    rows = {}
    for name, runs in got.items():
        mib = float(np.median([g["added_mib"] for g in runs]))
        per_step = float(np.median([g["seconds"] for g in runs])) / args.steps
        rows[name] = (mib, per_step)
        print(f"{name:>16}: peak memory added {mib:8.1f} MiB, {per_step:.3f} s per step")
    (whole_mib, whole_s), (chunk_mib, chunk_s) = rows.values()
    diff = max(
        float(np.abs(a["margins"] - b["margins"]).max()) for a, b in zip(*got.values(), strict=True)
    )
    print(f"chunked / one batch: memory {chunk_mib / whole_mib:.3f}, time per step "
          f"{chunk_s / whole_s:.3f}; largest difference in final margins {diff:.2e}")  # fmt: skip
    print(json.dumps({"points": points, "memory_ratio": chunk_mib / whole_mib,
                      "time_ratio": chunk_s / whole_s, "max_margin_diff": diff}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
