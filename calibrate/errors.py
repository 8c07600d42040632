"""The one error type calibration raises for bad input: a one-line message, no traceback."""

from __future__ import annotations


class CalibrationError(Exception):
    """Bad calibration input (model, data or options): the CLI prints one line and exits 2."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)
