"""The one error type calibration raises for bad input: a one-line message, no traceback."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CalibrationError(Exception):
    """Bad calibration input (model, data or options): the CLI prints one line and exits 2."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The exception's first sentence without terminal colours: messages stay one short line."""
    text = _ANSI.sub("", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0].split('. ')[0].rstrip('.')}"
