"""Shared test helpers."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibrate.errors import CalibrationError
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


def expect_error(fn: Callable[[], object], *parts: str) -> str:
    """Run `fn`, expect a one-line CalibrationError mentioning every one of `parts`."""
    with pytest.raises(CalibrationError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def first_per_class(npz_path: Path, per_class: int, out: Path) -> Path:
    """A copy of a clean-set .npz with only the first `per_class` images of each class."""
    npz = np.load(npz_path)
    labels = npz["labels"]
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)])
    np.savez(out, images=npz["images"][keep], labels=labels[keep], class_names=npz["class_names"])
    return out
