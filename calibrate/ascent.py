"""Projected gradient ascent on class margins over the pixel box [0,1]^d (SPEC 2 and 5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

AscentOptimizer = Literal["adam", "sgd"]


def margins(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """m_k = g_k - max_{i != k} g_i per row, the max taken with the own class masked by -inf."""
    own = logits.gather(1, k.view(-1, 1)).squeeze(1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, k.view(-1, 1), True)
    return own - logits.masked_fill(mask, float("-inf")).amax(dim=1)


@dataclass(frozen=True)
class AscentSettings:
    """steps: at most this many ascent steps; lr: step size in pixel units; optimizer: `sgd` is
    the reference's plain gradient ascent, `adam` is scale-free; rel_tol: stop early when the
    summed margin changes by less than this fraction (0 disables)."""

    steps: int
    lr: float
    optimizer: AscentOptimizer = "adam"
    rel_tol: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"ascent steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"ascent lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"ascent optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


def ascent_optimizer(x: torch.Tensor, settings: AscentSettings) -> torch.optim.Optimizer:
    """Adam or plain gradient ascent on the points x (a leaf tensor)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam([x], lr=settings.lr, maximize=True)
    return torch.optim.SGD([x], lr=settings.lr, maximize=True)


def random_starts(
    num_classes: int,
    per_class: int,
    chw: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K * J uniform random points of [0,1]^d and their target classes (class-major order),
    drawn on the CPU from `generator` (the same points on every device), then moved to
    `device`."""
    x = torch.rand((num_classes * per_class, *chw), generator=generator)
    k = torch.arange(num_classes).repeat_interleave(per_class)
    return x.to(device), k.to(device)


def maximize_margins(
    net: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    targets: torch.Tensor,
    settings: AscentSettings,
    on_step: Callable[[], None] | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascend every start's own-class margin together, one optimiser step for all (each row is
    independent: BatchNorm is in eval mode), clamping to [0,1] after each step. Returns the
    points and their final margins.

    batch_size: the forward/backward passes of a step run over chunks of at most this many
    points, their gradients accumulated before the one optimiser step, so memory does not grow
    with the number of points (K classes times the starts per class: 3,000 for a 100-class
    model). Each row's gradient is its own margin's and Adam's update is elementwise, so the
    result does not depend on it. None: one chunk.

    With ``rel_tol`` each class stops on its own, once its summed margin changes by less than
    that fraction in a step (SPEC 5 runs one ascent per class); its points are then left where
    they are and drop out of the batch. One rule over the whole batch would let classes with
    large margins end the ascent of a class that is still climbing."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"ascent batch_size must be >= 1, got {batch_size}")
    x = x0.detach().clone().requires_grad_(True)
    opt = ascent_optimizer(x, settings)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    previous: dict[int, float] = {}
    for _ in range(settings.steps):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        opt.zero_grad(set_to_none=True)
        m = _margins_backward(net, x, targets, rows, batch_size)
        with torch.no_grad():
            settled = x[~active].clone()
            opt.step()
            x.clamp_(0.0, 1.0)
            x[~active] = settled  # Adam's momentum would still move them
        if on_step is not None:
            on_step()
        if settings.rel_tol > 0:
            _settle_classes(m, targets, rows, active, previous, settings.rel_tol)
    with torch.no_grad():
        size = batch_size or max(len(x), 1)
        final = torch.cat(
            [margins(net(x[i : i + size]), targets[i : i + size]) for i in range(0, len(x), size)]
        )
    return x.detach(), final.detach()


def _margins_backward(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int | None,
) -> torch.Tensor:
    """The margins of x[rows] (detached), their sum's gradient accumulated into x.grad over
    chunks of at most batch_size rows."""
    size = batch_size or rows.numel()
    if rows.numel() == len(x) and size >= len(x):  # every row, one chunk: no copy of x
        m = margins(net(x), targets)
        m.sum().backward()
        return m.detach()
    parts = []
    for i in range(0, rows.numel(), size):
        part = rows[i : i + size]
        m = margins(net(x[part]), targets[part])
        m.sum().backward()
        parts.append(m.detach())
    return torch.cat(parts)


def _settle_classes(
    m: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    active: torch.Tensor,
    previous: dict[int, float],
    rel_tol: float,
) -> None:
    """Mark inactive every class whose summed margin `m` (over its active `rows`) changed by
    less than `rel_tol` relatively since the last step."""
    k = targets[rows]
    for c in k.unique().tolist():
        value = float(m[k == c].sum())
        before = previous.get(c)
        if before is not None and abs(value - before) < rel_tol * max(abs(before), 1e-12):
            active[targets == c] = False
        previous[c] = value
