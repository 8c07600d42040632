"""The MMAC lambda controller and the stopping rule (SPEC section 2), step by step."""

from __future__ import annotations

import math

import pytest

from calibrate.schedule import LambdaController, converged


def _reference() -> LambdaController:
    return LambdaController(0.4, warmup=30, every=10, factor=1.2, target=0.95)


def test_controller_step_by_step() -> None:
    c = _reference()
    # iterations 1..39 never move, whatever the agreement (alternate bad / perfect agreement)
    for it in range(1, 40):
        assert c.update(it, 0.0 if it % 2 else 1.0) == 0.4, it
    # iteration 40 = warmup + every: agreement 0.96 >= 0.95 -> 0.4 * 1.2 = 0.48
    assert c.update(40, 0.96) == pytest.approx(0.48, abs=1e-12)
    assert c.lam == pytest.approx(0.48, abs=1e-12)
    # 41..49: unchanged even with terrible agreement
    for it in range(41, 50):
        assert c.update(it, 0.0) == pytest.approx(0.48, abs=1e-12), it
    # iteration 50, agreement 0.90 < 0.95 -> 0.48 / 1.2 = 0.4
    assert c.update(50, 0.90) == pytest.approx(0.4, abs=1e-12)
    # iteration 60, agreement exactly at target counts as agreeing -> 0.4 * 1.2 = 0.48
    assert c.update(60, 0.95) == pytest.approx(0.48, abs=1e-12)
    # iteration 70 with perfect agreement -> 0.48 * 1.2 = 0.576
    assert c.update(70, 1.0) == pytest.approx(0.576, abs=1e-12)


def test_controller_does_not_move_at_end_of_warmup() -> None:
    c = _reference()
    # iteration 30 = warmup: (30 - 30) % 10 == 0 but it is still inside the warmup
    assert c.update(30, 1.0) == 0.4
    assert c.update(30, 0.0) == 0.4


def test_controller_defaults_are_the_reference() -> None:
    c = LambdaController(0.4)
    assert (c.warmup, c.every, c.factor, c.target, c.fixed) == (30, 10, 1.2, 0.95, False)
    for it in range(1, 40):
        c.update(it, 1.0)
    assert c.lam == 0.4
    assert c.update(40, 1.0) == pytest.approx(0.48)


def test_controller_repeated_decreases() -> None:
    c = LambdaController(1.44, warmup=0, every=1, factor=1.2)
    # warmup 0, every 1: moves after every iteration: 1.44 / 1.2 = 1.2, / 1.2 = 1.0
    assert c.update(1, 0.5) == pytest.approx(1.2)
    assert c.update(2, 0.5) == pytest.approx(1.0)


def test_controller_fixed_never_moves() -> None:
    c = LambdaController(0.4, fixed=True)
    for it in range(1, 121):
        assert c.update(it, 1.0 if it % 20 else 0.0) == 0.4


def test_controller_zero_lambda_allowed_and_stays_zero() -> None:
    c = LambdaController(0.0, warmup=0, every=1)
    assert c.update(1, 1.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lam": -0.1},
        {"lam": math.nan},
        {"lam": math.inf},
        {"lam": 0.4, "every": 0},
        {"lam": 0.4, "every": -10},
        {"lam": 0.4, "factor": 1.0},
        {"lam": 0.4, "factor": 0.5},
        {"lam": 0.4, "target": 0.0},
        {"lam": 0.4, "target": 1.01},
        {"lam": 0.4, "target": -0.5},
    ],
)
def test_controller_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LambdaController(**kwargs)


def test_controller_target_one_allowed() -> None:
    c = LambdaController(0.4, warmup=0, every=1, target=1.0)
    assert c.update(1, 0.999) == pytest.approx(0.4 / 1.2)
    assert c.update(2, 1.0) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------
# converged: |current - previous| <= rel_tol * |previous|


def test_converged_relative_change() -> None:
    # |99.95 - 100| = 0.05 <= 1e-3 * 100 = 0.1 -> converged
    assert converged(100.0, 99.95, 1e-3) is True
    # |99.8 - 100| = 0.2 > 0.1 -> not converged
    assert converged(100.0, 99.8, 1e-3) is False
    # relative to the magnitude, sign-independent: |-100.05 + 100| = 0.05 <= 0.1
    assert converged(-100.0, -100.05, 1e-3) is True
    # an increase counts the same as a decrease: |100.2 - 100| = 0.2 > 0.1
    assert converged(100.0, 100.2, 1e-3) is False


def test_converged_zero_loss() -> None:
    assert converged(0.0, 0.0, 1e-5) is True
    # 1e-3 change from 0: 1e-3 > 1e-5 * 1e-12 -> not converged
    assert converged(0.0, 1e-3, 1e-5) is False


def test_converged_identical_values() -> None:
    assert converged(3.7, 3.7, 1e-9) is True


@pytest.mark.parametrize("rel_tol", [0.0, -1e-3])
def test_converged_nonpositive_tol_never(rel_tol: float) -> None:
    assert converged(1.0, 1.0, rel_tol) is False
    assert converged(0.0, 0.0, rel_tol) is False


@pytest.mark.parametrize(
    ("previous", "current"),
    [
        (math.nan, 1.0),
        (1.0, math.nan),
        (math.nan, math.nan),
        (math.inf, math.inf),
        (1.0, -math.inf),
    ],
)
def test_converged_non_finite_never(previous: float, current: float) -> None:
    assert converged(previous, current, 0.5) is False
