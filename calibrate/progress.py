"""A progress bar for the long steps (tqdm on stderr), silent with --quiet."""

from __future__ import annotations

from types import TracebackType
from typing import Any


class Progress:
    def __init__(self, what: str, total: int, quiet: bool) -> None:
        self._bar: Any = None
        if not quiet:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=what, unit="it", leave=False, dynamic_ncols=True, disable=None
            )  # disable=None: no bar when stderr is not a terminal

    def tick(self, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
