"""`mmguard` with a slow device: every inference batch first sleeps --batch-delay-s, everything
else is the real command (its argument parsing, signal handling, shutdown). The reliability tests
run it as a child process to make the drain after SIGTERM last long enough to be watched:

    python -m tests.faulty_serve --batch-delay-s 0.05 serve ARTIFACT_DIR ...
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batch-delay-s", type=float, required=True)
    ap.add_argument("mmguard_args", nargs=argparse.REMAINDER, help="passed to `mmguard`")
    args = ap.parse_args(argv)

    import numpy as np

    from guard import engine
    from guard.cli import main as mmguard

    logits = engine.GuardEngine.logits
    delay = args.batch_delay_s

    def slow_logits(
        self: engine.GuardEngine, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        time.sleep(delay)
        return logits(self, x)

    engine.GuardEngine.logits = slow_logits  # type: ignore[method-assign]
    return mmguard(args.mmguard_args)


if __name__ == "__main__":
    sys.exit(main())
