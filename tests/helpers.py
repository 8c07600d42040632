"""Shared test helpers."""

from __future__ import annotations

import contextlib
import io

from guard.cli import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run `mmguard` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()
