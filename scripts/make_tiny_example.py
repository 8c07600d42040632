"""Regenerate the shipped tiny backdoored example (calibrate/examples/tiny) in a few seconds.

The example is checked in so that docs and smoke tests run without training; this script is how it
was made, so anyone can rebuild it bit-for-bit on the same torch version and thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as `python scripts/make_tiny_example.py` from a checkout: the package need not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.synthetic import write_example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the tiny backdoored example.")
    parser.add_argument("--out", type=Path, default=Path("calibrate/examples/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-per-class-clean", type=int, default=30)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = write_example(args.out, n_per_class_clean=args.n_per_class_clean, seed=args.seed)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
