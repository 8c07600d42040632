"""The MMAC / MMOM alternation (SPEC sections 2 and 3): ascend the class margins of K x J
starts, then descend the bounds on fidelity + lambda * mean maximum margin, until settled."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.ascent import (
    AscentSettings,
    ascent_optimizer,
    margins,
    maximize_margins,
    random_starts,
)
from calibrate.bounded import BoundedNetwork
from calibrate.config import CalibrationConfig
from calibrate.schedule import LambdaController, converged


@dataclass
class MitigationResult:
    history: list[dict[str, float]] = field(default_factory=list)
    maxima: torch.Tensor | None = None
    maxima_targets: torch.Tensor | None = None
    iterations: int = 0
    seconds: float = 0.0
    final_lambda: float = 0.0
    # an MMAC run still below its agreement target after max_iters + overtime_iters returns the
    # bounds of the last iteration that met it: that iteration's number, else None
    bounds_from_iteration: int | None = None
    # the bounds as the first iteration left them (the start detector's)
    start_bounds: list[torch.Tensor] | None = None


def _fidelity(
    objective: str, bounded_logits: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """Summed (not averaged) fidelity over a chunk. MMAC: (1/K)||g(x;Z) - g(x)||^2 against the
    original logits (Eq. 4). MMOM: cross-entropy against the true labels (Eq. 5)."""
    if objective == "mmac":
        return ((bounded_logits - reference) ** 2).mean(dim=1).sum()
    return F.cross_entropy(bounded_logits, reference, reduction="sum")


def _bound_optimizer(net: BoundedNetwork, cfg: CalibrationConfig) -> torch.optim.Adam:
    """Adam on the bounds; with bound_lr_relative each layer's rate is scaled by the layer's
    mean initial bound, so steps are a fixed fraction of that layer's activation scale."""
    sched = cfg.schedule
    groups = []
    for b in net.bounds():
        lr = sched.bound_lr
        if sched.bound_lr_relative:
            lr *= max(float(b.detach().mean()), 1e-6)
        groups.append({"params": [b], "lr": lr})
    return torch.optim.Adam(groups)


def learn_bounds(
    net: BoundedNetwork,
    original: nn.Module,
    images: torch.Tensor,
    reference: torch.Tensor,
    num_classes: int,
    per_class: int,
    cfg: CalibrationConfig,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    initial_maxima: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MitigationResult:
    """Optimise the bounds in place.

    images: the clean learning set D in [0,1]; reference: its original logits (MMAC) or its
    true labels (MMOM). per_class: J, the ascent starts per class. initial_maxima: K x J
    points already ascended (class-major), used instead of the cold ascent.
    """
    sched = cfg.schedule
    bs = cfg.batch_size
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    chw = tuple(images.shape[1:])
    cold = AscentSettings(sched.cold_ascent_steps, sched.ascent_lr, sched.ascent_optimizer)
    # With maxima from the bounded network, one ascent step per iteration rides on the descent
    # step's own forward/backward pass (the margin term's gradient with respect to the maxima),
    # so it costs nothing extra; further warm steps run before it with Z fixed.
    fused = sched.mm_source == "bounded" and sched.warm_ascent_steps >= 1
    warm = AscentSettings(
        max(sched.warm_ascent_steps - 1, 0), sched.ascent_lr, sched.ascent_optimizer
    )
    source: Callable[[torch.Tensor], torch.Tensor] = (
        net if sched.mm_source == "bounded" else original
    )
    lam = LambdaController(
        sched.mmom_lambda if cfg.objective == "mmom" else sched.lambda_init,
        warmup=sched.lambda_warmup,
        every=sched.lambda_every,
        factor=sched.lambda_factor,
        target=cfg.target_agreement,
        fixed=cfg.objective == "mmom",
    )
    opt = _bound_optimizer(net, cfg)
    if cfg.objective == "mmac":
        agree_with = reference.argmax(dim=1)
    else:
        agree_with = batched_logits(original, images, cfg.batch_size).argmax(dim=1)
    result = MitigationResult()
    if initial_maxima is not None:  # already ascended (warm start)
        x_max, k_max = initial_maxima[0].detach().clone(), initial_maxima[1]
    else:
        x_max, k_max = random_starts(num_classes, per_class, chw, gen, images.device)
        x_max, _ = maximize_margins(source, x_max, k_max, cold, batch_size=bs)
    x_max.requires_grad_(fused)
    opt_x = ascent_optimizer(x_max, warm) if fused else None
    previous = float("nan")
    # the bounds each MMAC iteration measured its agreement with, kept while it met the target
    last_on_target: tuple[int, list[torch.Tensor]] | None = None
    for it in range(1, sched.max_iters + sched.overtime_iters + 1):
        if sched.mm_source == "bounded" and warm.steps:
            with torch.no_grad():
                x_max.copy_(maximize_margins(net, x_max, k_max, warm, batch_size=bs)[0])
        elif sched.mm_source == "original" and (it - 1) % sched.redraw_every == 0 and it > 1:
            x_max, k_max = random_starts(num_classes, per_class, chw, gen, images.device)
            x_max, _ = maximize_margins(original, x_max, k_max, cold, batch_size=bs)
        if opt_x is not None:
            opt_x.zero_grad(set_to_none=True)
        measured = [b.detach().clone() for b in net.bounds()] if cfg.objective == "mmac" else []
        row = _descent_step(net, opt, images, reference, agree_with, x_max, k_max, lam.lam, cfg)
        if it == 1:
            result.start_bounds = [b.detach().clone() for b in net.bounds()]
        # MMAC is not done while the controller is still pulling agreement back to its target
        on_target = cfg.objective == "mmom" or row["agreement"] >= cfg.target_agreement
        if measured and on_target:
            last_on_target = (it, measured)
        if opt_x is not None:
            opt_x.step()  # ascent on the maxima from the same pass, Z as it was
            with torch.no_grad():
                x_max.clamp_(0.0, 1.0)
        row["iter"] = it
        result.history.append(row)
        lam.update(it, row["agreement"])
        if progress is not None:
            progress(it, row)
        settled = converged(previous, row["loss"], sched.loss_rel_tol)
        if it >= sched.min_iters and on_target and settled:
            break
        if it >= sched.max_iters and on_target:  # at or past the cap: stop once on target
            break
        previous = row["loss"]
    ended_off_target = cfg.objective == "mmac" and row["agreement"] < cfg.target_agreement
    if ended_off_target and last_on_target is not None:
        result.bounds_from_iteration, kept = last_on_target
        with torch.no_grad():
            for bound, value in zip(net.bounds(), kept, strict=True):
                bound.copy_(value)
    result.maxima, result.maxima_targets = x_max.detach(), k_max
    result.iterations = len(result.history)
    result.final_lambda = lam.lam
    result.seconds = time.perf_counter() - started
    return result


def _descent_step(
    net: BoundedNetwork,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    reference: torch.Tensor,
    agree_with: torch.Tensor,
    x_max: torch.Tensor,
    k_max: torch.Tensor,
    lam: float,
    cfg: CalibrationConfig,
) -> dict[str, float]:
    """One Adam step on the bounds with the maxima fixed; gradients are accumulated over chunks
    so memory does not grow with |D| or K*J. Returns the iteration's figures."""
    opt.zero_grad(set_to_none=True)
    n, m, bs = images.shape[0], x_max.shape[0], cfg.batch_size
    fid_total, agree = 0.0, 0
    for i in range(0, n, bs):
        out = net(images[i : i + bs])
        fid = _fidelity(cfg.objective, out, reference[i : i + bs]) / n
        fid.backward()
        fid_total += float(fid.detach())
        agree += int((out.detach().argmax(dim=1) == agree_with[i : i + bs]).sum())
    margin_total = 0.0
    for i in range(0, m, bs):
        mar = margins(net(x_max[i : i + bs]), k_max[i : i + bs]).sum() / m
        (lam * mar).backward()
        margin_total += float(mar.detach())
    opt.step()
    net.clamp_()
    return {
        "loss": fid_total + lam * margin_total,
        "fidelity": fid_total,
        "margin": margin_total,
        "lambda": lam,
        "agreement": agree / max(n, 1),
    }


def batched_logits(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int
) -> torch.Tensor:
    """Logits of `net` on `x` in chunks of `bs`, without autograd."""
    with torch.no_grad():
        return torch.cat([net(x[i : i + bs]) for i in range(0, x.shape[0], bs)])
