"""A factory module whose import fails in its own code (tests/test_modelsrc.py)."""

raise RuntimeError("no GPU in this process")


def make() -> None:  # pragma: no cover - never reached
    pass
