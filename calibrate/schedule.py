"""The lambda controller and the stopping rule of the MMAC alternation (SPEC section 2). Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LambdaController:
    """[code]: after `warmup` iterations, every `every` iterations, lambda *= factor while the
    bounded network still agrees with the original on >= `target` of the clean set, else
    lambda /= factor. Iterations are counted from 1: with the defaults lambda moves after
    iterations 40, 50, 60, ...

    `fixed=True` (MMOM) keeps lambda constant.
    """

    lam: float
    warmup: int = 30
    every: int = 10
    factor: float = 1.2
    target: float = 0.95
    fixed: bool = False

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be finite and >= 0, got {self.lam}")
        if self.every < 1:
            raise ValueError(f"lambda update period must be >= 1, got {self.every}")
        if self.factor <= 1.0:
            raise ValueError(f"lambda factor must be > 1, got {self.factor}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target agreement must be in (0, 1], got {self.target}")

    def update(self, iteration: int, agreement: float) -> float:
        """Call after iteration `iteration` (1-based) with that iteration's clean agreement."""
        if self.fixed or iteration <= self.warmup or (iteration - self.warmup) % self.every:
            return self.lam
        self.lam = self.lam * self.factor if agreement >= self.target else self.lam / self.factor
        return self.lam


def converged(previous: float, current: float, rel_tol: float) -> bool:
    """Stop when the loss changes by less than rel_tol relative to its magnitude."""
    if rel_tol <= 0 or not (math.isfinite(previous) and math.isfinite(current)):
        return False
    return abs(current - previous) <= rel_tol * max(abs(previous), 1e-12)
