"""The MMAC alternation's end state (calibrate/mitigate.py): the bounds it returns meet the
agreement target whenever any iteration did."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from calibrate.bounded import BoundedNetwork
from calibrate.config import CalibrationConfig, ScheduleConfig
from calibrate.mitigate import batched_logits, learn_bounds

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class _Centre(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.5


def _setup(
    lambda_init: float, max_iters: int, **schedule_overrides: Any
) -> tuple[BoundedNetwork, nn.Module, torch.Tensor, torch.Tensor, CalibrationConfig]:
    torch.manual_seed(0)
    model = nn.Sequential(
        _Centre(),
        nn.Flatten(),
        nn.Linear(12, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    ).eval()
    with torch.no_grad():  # zero-mean inputs and weights large enough that every class occurs
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 1.0)
                layer.bias.zero_()
    images = torch.rand(80, 3, 2, 2)
    net = BoundedNetwork(model, images[:2])
    net.init_bounds("max", images)
    schedule = ScheduleConfig(
        max_iters=max_iters,
        min_iters=max_iters,
        loss_rel_tol=0.0,
        cold_ascent_steps=5,
        lambda_init=lambda_init,
        lambda_warmup=10_000,  # the controller never acts: nothing pulls agreement back
        bound_lr=0.2,
        overtime_iters=0,
    )
    schedule = dataclasses.replace(schedule, **schedule_overrides)
    cfg = dataclasses.replace(CalibrationConfig(), schedule=schedule)
    with torch.no_grad():
        reference = model(images)
    return net, model, images, reference, cfg


def _agreement(net: BoundedNetwork, model: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        a = batched_logits(net, images, 256).argmax(1)
        b = model(images).argmax(1)
    return int((a == b).sum()) / len(a)


def test_a_run_ending_below_the_agreement_target_returns_the_last_bounds_that_met_it() -> None:
    net, model, images, reference, cfg = _setup(lambda_init=50.0, max_iters=30)
    result = learn_bounds(net, model, images, reference, 4, 5, cfg)
    agreements = [row["agreement"] for row in result.history]
    assert agreements[-1] < cfg.target_agreement  # the margin term won: the run ended off target
    met = [i + 1 for i, a in enumerate(agreements) if a >= cfg.target_agreement]
    assert result.bounds_from_iteration == met[-1]
    # the returned bounds are exactly those that iteration measured its agreement with
    assert _agreement(net, model, images) == agreements[met[-1] - 1]
    assert _agreement(net, model, images) >= cfg.target_agreement


def test_a_run_ending_on_target_keeps_its_final_bounds() -> None:
    net, model, images, reference, cfg = _setup(lambda_init=0.0, max_iters=5)
    result = learn_bounds(net, model, images, reference, 4, 5, cfg)
    assert result.history[-1]["agreement"] >= cfg.target_agreement
    assert result.bounds_from_iteration is None


def _scripted(monkeypatch: pytest.MonkeyPatch, agreements: list[float]) -> None:
    """Replace the descent step: iteration i reports agreements[i - 1] and then adds 1 to every
    bound, so the bounds measured at iteration i are init + (i - 1)."""
    import calibrate.mitigate as mitigate

    calls = iter(agreements)

    def step(net: BoundedNetwork, *args: Any) -> dict[str, float]:
        row = {"loss": 1.0, "fidelity": 0.0, "margin": 1.0, "lambda": 0.0, "agreement": next(calls)}
        with torch.no_grad():
            for b in net.bounds():
                b.add_(1.0)
        return row

    monkeypatch.setattr(mitigate, "_descent_step", step)


@pytest.mark.parametrize(
    ("agreements", "iterations", "from_iteration", "steps_kept"),
    [
        # below target at the cap (iteration 4): overtime runs until iteration 6 meets it again
        ([1.0, 0.96, 0.9, 0.9, 0.92, 0.97, 1.0, 1.0], 6, None, 6),
        # still below after 3 overtime iterations: the bounds iteration 2 was measured with
        ([1.0, 0.96, 0.9, 0.9, 0.92, 0.93, 0.94], 7, 2, 1),
        # on target at the cap: the loss never settles (tol 0) but the run stops there
        ([1.0, 0.9, 0.9, 0.96, 0.9], 4, None, 4),
    ],
)
def test_overtime_and_the_fallback_to_the_last_bounds_on_target(
    monkeypatch: pytest.MonkeyPatch,
    agreements: list[float],
    iterations: int,
    from_iteration: int | None,
    steps_kept: int,
) -> None:
    net, model, images, reference, cfg = _setup(lambda_init=1.0, max_iters=4, overtime_iters=3)
    init = [b.detach().clone() for b in net.bounds()]
    _scripted(monkeypatch, agreements)
    result = learn_bounds(net, model, images, reference, 4, 5, cfg)
    assert result.iterations == iterations
    assert result.bounds_from_iteration == from_iteration
    for b, b0 in zip(net.bounds(), init, strict=True):
        torch.testing.assert_close(b.detach(), b0 + steps_kept, rtol=0, atol=0)


@pytest.mark.parametrize("ceiling", [True, False])
def test_a_ceiling_holds_every_bound_at_its_clean_maximum(ceiling: bool) -> None:
    """Bounds started low climb under the fidelity term. Adam's momentum carries them past the
    clean maximum; with a ceiling none ends above it, and those that got there sit on it."""
    net, model, images, reference, cfg = _setup(
        lambda_init=0.0, max_iters=40, bound_lr=0.5, bound_lr_relative=False
    )
    net.init_bounds(0.05, images, ceiling=ceiling)
    clean_max = [m.observed_max.clone() for m in net.bound_modules()]
    learn_bounds(net, model, images, reference, 4, 5, cfg)
    pairs = [(b.detach(), mx) for b, mx in zip(net.bounds(), clean_max, strict=True)]
    above = sum(int((b > mx + 1e-6).sum()) for b, mx in pairs)
    on = sum(int((b == mx).sum()) for b, mx in pairs)
    if ceiling:
        assert above == 0 and on > 0
    else:
        assert above > 0  # what the ceiling prevents
