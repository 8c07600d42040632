"""Train (once) the benchmark's BadNets-backdoored CIFAR ResNet-18 and print its metrics as JSON.

Run from the repository root: ``.venv/bin/python -m benchmarks.train_badnets``. A second run with
the same width, epochs and seed reuses the cached weights and returns immediately.
"""

from __future__ import annotations

import os

# Must precede the torch import: busy-waiting OpenMP threads slow training several-fold as soon
# as another process shares the CPU, while passive waiting costs nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path

from benchmarks.cifar import (
    DEFAULT_EPOCHS,
    DEFAULT_RATE,
    DEFAULT_SEED,
    DEFAULT_TARGET,
    DEFAULT_WIDTH,
    get_or_train_badnets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Defaults point at the developer checkout's shared data and git-ignored cache."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz",
        help="CIFAR-10 JPEG archive (only read when the model is not cached yet)",
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--target", type=int, default=DEFAULT_TARGET)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    return parser.parse_args(argv)


def _print_progress(epoch: int, loss: float, seconds: float) -> None:
    """Per-epoch line on stderr, so stdout stays pure JSON."""
    print(f"epoch {epoch} loss {loss:.4f} seconds {seconds:.1f}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _, metrics = get_or_train_badnets(
        args.data,
        args.cache_dir,
        width=args.width,
        epochs=args.epochs,
        seed=args.seed,
        target=args.target,
        rate=args.rate,
        progress=_print_progress,
    )
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
