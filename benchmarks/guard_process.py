"""Kept for the benchmarks' imports: the child-process server lives in :mod:`guard.process`."""

from guard.process import GuardProcess, mmguard_command

__all__ = ["GuardProcess", "mmguard_command"]
