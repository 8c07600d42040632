"""The MMAC alternation's end state (calibrate/mitigate.py): the bounds it returns meet the
agreement target whenever any iteration did."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from calibrate.bounded import BoundedNetwork
from calibrate.config import CalibrationConfig, ScheduleConfig
from calibrate.mitigate import batched_logits, learn_bounds


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class _Centre(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.5


def _setup(
    lambda_init: float, max_iters: int
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
    )
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
