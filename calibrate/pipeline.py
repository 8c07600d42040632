"""`mmguard calibrate` end to end: load, check, learn the bounds, fit the null, MM-BD, export,
verify, report, and move the finished artifact into place."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibrate.artifact import check_output, library_versions, staging_dir, write_manifest
from calibrate.ascent import AscentSettings, maximize_margins, random_starts
from calibrate.bounded import BoundedNetwork, Normalized
from calibrate.config import DEFAULT_NULL, CalibrationConfig, gpd_min_heldout, null_size_problem
from calibrate.dataset import CleanSet, load_clean_set, split_clean_set
from calibrate.device import describe, device_of, resolve_device
from calibrate.errors import CalibrationError
from calibrate.evaluation import clean_set_figures, heldout_figures
from calibrate.export import OPSET, OUTPUT_NAME, TOLERANCE, check_exportable, export_verified
from calibrate.mitigate import MitigationResult, batched_logits, learn_bounds
from calibrate.mmbd import verdict
from calibrate.modelsrc import ModelSource, count_output_classes, load_model
from calibrate.progress import Progress
from calibrate.rangeprobe import (
    CLASS_FLOOR,
    RANGE_FLOOR,
    RATIO_OUTPUT,
    RangeNetwork,
    balance,
    classes_with_own_scales,
    clean_scales,
    inverse_tables,
    leave_one_out_ratios,
    per_image_maxima,
    ratio_denominators,
    scale_rank,
)
from calibrate.report import write_report
from calibrate.scripted import script_to_fx
from guard.artifact import NETWORK_FILES, START_FILE
from guard.mmdf import (
    fit_null,
    range_statistic,
    statistic,
    threshold,
)


@dataclass(frozen=True)
class CalibrationJob:
    model: ModelSource
    data: Path
    out: Path
    name: str
    mean: tuple[float, ...] | None = None  # input normalisation folded into the graphs
    std: tuple[float, ...] | None = None
    min_per_class: int = 10
    image_size: tuple[int, int] | None = None
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    force: bool = False
    quiet: bool = False
    # where the torch work runs (`calibrate.device.resolve_device`: auto, cpu, cuda, cuda:N)
    device: str = "cpu"
    # diagnostics: called after every bound-learning iteration with the iteration (from 1), its
    # figures, the bounded network as that iteration left it and the original; must not
    # change either network
    observer: Callable[[int, dict[str, float], BoundedNetwork, nn.Module], None] | None = None


@dataclass(frozen=True)
class CalibrationOutcome:
    out: Path
    report: dict[str, Any]
    manifest: dict[str, Any]


def _prepare_model(job: CalibrationJob, clean: CleanSet) -> nn.Module:
    k = len(clean.class_names)
    chw = tuple(int(v) for v in clean.images.shape[1:])
    model = load_model(job.model, k)
    if isinstance(model, torch.jit.ScriptModule):
        model = script_to_fx(model, torch.from_numpy(clean.images[:2]))
    if (job.mean is None) != (job.std is None):
        raise CalibrationError("give both --mean and --std, or neither")
    if job.mean is not None and job.std is not None:
        if len(job.mean) != chw[0]:
            raise CalibrationError(f"--mean has {len(job.mean)} values for {chw[0]}-channel images")
        model = Normalized(model, job.mean, job.std).eval()
    try:
        k_out = count_output_classes(model, (chw[0], chw[1], chw[2]))
    except CalibrationError as exc:
        hint = ""
        if chw[0] == 3 and _accepts(model, (1, chw[1], chw[2])):
            hint = (
                "; it takes single-channel images: give them as an .npz of [N, H, W] or "
                "[N, 1, H, W] (an ImageFolder is read as RGB)"
            )
        raise CalibrationError(
            f"the model does not accept images of shape {chw}: {exc}{hint}"
        ) from None
    if k_out != k:
        raise CalibrationError(f"the model outputs {k_out} classes but the clean data has {k}")
    # now, on the CPU where the real export runs, not after the ascent and the learning
    check_exportable(model, torch.from_numpy(clean.images[:1]))
    return model


def _accepts(model: nn.Module, chw: tuple[int, int, int]) -> bool:
    """Whether `model` runs on zeros of shape [1, *chw]."""
    try:
        count_output_classes(model, chw)
    except CalibrationError:
        return False
    return True


def _check_finite(logits: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero()
    if bad.numel():
        raise CalibrationError(f"the model produces NaN/inf logits on {what} image #{int(bad[0])}")


def _check_null_size(cfg: CalibrationConfig, n_heldout: int, n_learning: int) -> None:
    """Refuse a null the clean images cannot carry (`null_size_problem`), for each null in use:
    the held-out images, and for the range detector the learning images as well."""
    nulls = [("", "--null", cfg.null_kind, 0)]
    if cfg.start_detector:
        nulls.append(("the start detector's ", "--start-null", cfg.start_null, 0))
    if cfg.range_detector:
        nulls.append(("the range detector's ", "--range-null", cfg.range_null, n_learning))
    for whose, flag, kind, n_always in nulls:
        problem = null_size_problem(kind, n_heldout, cfg.test_level, n_always)
        if problem is not None:
            article, other = ("an ", "gaussian") if kind == "empirical" else ("a ", "yeojohnson")
            raise CalibrationError(
                f"{whose or article}{problem}; use more clean images, a larger "
                f"--heldout-fraction, or {flag} {other}"
            )


def _learning_set(
    cfg: CalibrationConfig, learn: CleanSet, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """D and its supervision: MMAC keeps the correctly classified images and their original
    logits; MMOM keeps all images with their true labels."""
    x = torch.from_numpy(learn.images).to(logits.device)
    y = torch.from_numpy(learn.labels).to(logits.device)
    if cfg.objective == "mmom":
        return x, y, 0
    keep = logits.argmax(dim=1) == y if cfg.correct_only else torch.ones_like(y, dtype=torch.bool)
    if int(keep.sum()) < 2:
        raise CalibrationError("the model classifies fewer than 2 learning images correctly")
    return x[keep], logits[keep], int((~keep).sum())


def mmbd_ascent(cfg: CalibrationConfig, steps: int) -> AscentSettings:
    """SPEC 5's ascent: the schedule's optimiser; a class stops when its relative change < 1e-5."""
    s = cfg.schedule
    return AscentSettings(steps, s.ascent_lr, s.ascent_optimizer, rel_tol=1e-5)


def _max_margins(
    net: Callable[[torch.Tensor], torch.Tensor],
    starts: tuple[torch.Tensor, torch.Tensor],
    k: int,
    steps: int,
    cfg: CalibrationConfig,
    progress: Progress,
) -> tuple[np.ndarray, torch.Tensor]:
    """r_k: the best margin over the starts of class k after at most `steps` ascent steps,
    each class stopping once its summed margin changes by less than 1e-5 relatively (SPEC 5).
    Also returns the final points."""
    x, m = maximize_margins(
        net, *starts, mmbd_ascent(cfg, steps), on_step=progress.tick, batch_size=cfg.batch_size
    )
    return m.view(k, -1).amax(dim=1).cpu().numpy().astype(np.float64), x


def original_maxima(
    model: nn.Module,
    k: int,
    per_class: int,
    chw: tuple[int, ...],
    cfg: CalibrationConfig,
    quiet: bool,
) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
    """MM-BD's ascent on the original network (SPEC 5) from max(mmbd_starts, J) uniform starts
    per class, ascended together (in chunks of batch_size). r_k uses the first mmbd_starts of
    each class; the points also seed the alternation's maxima. Returns r and (points, classes)
    in class-major order."""
    n = max(cfg.mmbd_starts, per_class)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    starts = random_starts(k, n, chw, gen, device=device_of(model))
    with Progress("MM-BD max margins", cfg.mmbd_steps, quiet) as bar:
        settings = mmbd_ascent(cfg, cfg.mmbd_steps)
        x, m = maximize_margins(
            model, *starts, settings, on_step=bar.tick, batch_size=cfg.batch_size
        )
    r = m.view(k, n)[:, : cfg.mmbd_starts].amax(dim=1).cpu().numpy().astype(np.float64)
    return r, (x, starts[1])


def _per_class(
    points: tuple[torch.Tensor, torch.Tensor], k: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n points of each class from class-major (points, classes)."""
    x, c = points
    per = x.shape[0] // k
    keep = (torch.arange(x.shape[0], device=x.device) % per) < n
    return x[keep].clone(), c[keep].clone()


def _bound_summary(net: BoundedNetwork, init: list[torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for site, b0, b in zip(net.sites, init, net.bounds(), strict=True):
        v = b.detach().double()
        rows.append(
            {
                "site": site.follows,
                "kind": site.kind,
                "channels": site.channels,
                "init_mean": float(b0.mean()),
                "init_max": float(b0.max()),
                "final_min": float(v.min()),
                "final_mean": float(v.mean()),
                "final_median": float(v.median()),
                "final_max": float(v.max()),
                "fraction_reduced": float((v < b0.double() - 1e-6).double().mean()),
                "values": [float(x) for x in v],
            }
        )
    return rows


def run_calibration(job: CalibrationJob) -> CalibrationOutcome:
    cfg = job.config
    t0 = time.perf_counter()
    check_output(job.out, job.force)  # say so now, not after minutes of work
    device = resolve_device(job.device)
    torch.manual_seed(cfg.seed)
    clean = load_clean_set(job.data, min_per_class=job.min_per_class, image_size=job.image_size)
    k = len(clean.class_names)
    model = _prepare_model(job, clean).to(device)
    learn, held = split_clean_set(clean, cfg.heldout_fraction, cfg.seed)
    x_learn = torch.from_numpy(learn.images).to(device)
    learn_logits = batched_logits(model, x_learn, cfg.batch_size)
    _check_finite(learn_logits, "learning")
    x_d, ref, dropped = _learning_set(cfg, learn, learn_logits)
    n_held, n_learning = int(held.labels.size), int(learn.labels.size)
    cfg = cfg.resolve(n_held, n_learning)  # the range detector on when its null fits
    _check_null_size(cfg, n_held, n_learning)
    per_class = cfg.starts_per_class or int(min(learn.per_class_counts()))
    chw = tuple(int(v) for v in x_learn.shape[1:])
    net = BoundedNetwork(model, x_d[:2])
    net.init_bounds(cfg.bound_init, x_d, cfg.batch_size, ceiling=cfg.bound_ceiling == "max")
    init = [b.detach().cpu().clone() for b in net.bounds()]  # the report reads them on the CPU
    timing: dict[str, float] = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    r_before, mmbd_maxima = original_maxima(model, k, per_class, chw, cfg, job.quiet)
    mmbd = verdict(r_before, cfg.mmbd_alpha)
    timing["mmbd"] = time.perf_counter() - t

    # the alternation starts from the MM-BD maxima (warm start) when its maxima come from the
    # bounded network; the reference schedule draws its own from the original network
    first = _per_class(mmbd_maxima, k, per_class) if cfg.schedule.mm_source == "bounded" else None
    with Progress("learning bounds", cfg.schedule.max_iters, job.quiet) as bar:

        def iteration_done(it: int, row: dict[str, float]) -> None:
            bar.tick(agree=row["agreement"], lam=row["lambda"])
            if job.observer is not None:
                job.observer(it, row, net, model)

        mit: MitigationResult = learn_bounds(
            net,
            model,
            x_d,
            ref,
            k,
            per_class,
            cfg,
            progress=iteration_done,
            initial_maxima=first,
        )
    timing["learn_bounds"] = mit.seconds

    t = time.perf_counter()
    x_held = torch.from_numpy(held.images).to(device)
    g_held = batched_logits(model, x_held, cfg.batch_size).cpu()
    _check_finite(g_held, "held-out")
    gz_held = batched_logits(net, x_held, cfg.batch_size).cpu()
    stats = statistic(g_held.numpy(), gz_held.numpy())
    null = _fit(stats, cfg.null_kind, "")
    start_net, start_stats, start_null, gs_held = None, None, None, None
    if cfg.start_detector:
        start_net = _start_network(model, x_d, net, mit)
        gs_held = batched_logits(start_net, x_held, cfg.batch_size).cpu().numpy()
        start_stats = statistic(g_held.numpy(), gs_held)
        start_null = _fit(start_stats, cfg.start_null, "start detector's ")
    ranged = fit_range_detector(net, learn, held, cfg) if cfg.range_detector else None
    try:
        figures = heldout_figures(
            g_held.numpy(),
            gz_held.numpy(),
            held.labels,
            cfg,
            gs_held,
            None if ranged is None else ranged.heldout_ratios,
            None if ranged is None else ranged.learning_stats,
        )
    except ValueError as exc:  # e.g. every held-out statistic equal, or a tail of ties
        raise CalibrationError(f"cannot fit a null on a half of the held-out set: {exc}") from None
    timing["null"] = time.perf_counter() - t

    t = time.perf_counter()
    # the report's "after": the bounded network's maxima, ascended from the original's
    after_steps = max(cfg.mmbd_steps // 3, 1)
    with Progress("max margins after", after_steps, job.quiet) as bar:
        x0, k0 = _per_class(mmbd_maxima, k, cfg.mmbd_starts)
        r_after, _ = _max_margins(net, (x0, k0), k, after_steps, cfg, bar)
    timing["margins_after"] = time.perf_counter() - t

    for module in (model, net, start_net, None if ranged is None else ranged.network):
        if module is not None:
            module.cpu()  # ONNX export and its check run on the CPU
    with staging_dir(job.out, job.force) as tmp:
        t = time.perf_counter()
        probe = x_held[:64].cpu()
        original_file = tmp / NETWORK_FILES["original"]
        if ranged is None:
            diffs = {"original": export_verified(model, probe, original_file)[0]}
        else:  # the original network, with the activation ratios as a second output
            outputs = (OUTPUT_NAME, RATIO_OUTPUT)
            diff = export_verified(ranged.network, probe, original_file, outputs=outputs)[0]
            diffs = {"original": diff}
        diffs["bounded"], fold_stats = export_verified(
            net, probe, tmp / NETWORK_FILES["bounded"], fold=True
        )
        if start_net is not None:
            diffs["start"] = export_verified(start_net, probe, tmp / START_FILE[1], fold=True)[0]
        timing["export"] = time.perf_counter() - t
        timing["total"] = time.perf_counter() - t0
        split = {
            "seed": cfg.seed,
            "heldout_fraction": cfg.heldout_fraction,
            "learn": int(learn.labels.size),
            "heldout": int(held.labels.size),
            "learn_per_class": learn.per_class_counts(),
            "heldout_per_class": held.per_class_counts(),
            "learn_used": int(x_d.shape[0]),
            "learn_dropped_misclassified": dropped,
        }
        null_info = _null_info(null, stats, cfg)
        bounds = _bound_summary(net, init)
        clean_logits = np.concatenate([learn_logits.cpu().numpy(), g_held.numpy()])
        report = {
            "schema_version": 1,
            "model_name": job.name,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": _describe(job.model),
                "num_classes": k,
                "class_names": list(clean.class_names),
                "input_shape": list(clean.images.shape[1:]),
            },
            "objective": cfg.objective,
            "config": _flat_config(cfg),
            "split": split,
            "heldout": figures,
            "clean_set": clean_set_figures(
                clean_logits.argmax(1), np.concatenate([learn.labels, held.labels]), k, clean_logits
            ),
            "null": null_info,
            "clean_statistics": [float(v) for v in stats],
            "max_margins": {"before": r_before.tolist(), "after": r_after.tolist()},
            "mmbd": mmbd.to_dict(),
            "bounds": bounds,
            "history": mit.history,
            "iterations": mit.iterations,
            "bounds_from_iteration": mit.bounds_from_iteration,
            "final_lambda": mit.final_lambda,
            "device": describe(device),
            "timing_s": timing,
        }
        if start_null is not None and start_stats is not None:
            start_info = _null_info(start_null, start_stats, cfg)
            report["start_detector"] = {
                "null": start_info,
                "clean_statistics": [float(v) for v in start_stats],
                "bounds_from_iteration": 1,
                "bounds": _bound_summary(start_net, init) if start_net is not None else [],
            }
        if job.config.null is None and cfg.null != DEFAULT_NULL:
            null_info["chosen"] = (
                f"{cfg.null_kind}: the {n_held} held-out images are too few for a "
                f"{DEFAULT_NULL} null, the default where there are {gpd_min_heldout()} or more"
            )
        if ranged is None and job.config.range_detector is None:
            report["range_detector_off"] = (
                f"off: the {n_learning} learning and {n_held} held-out images are too few for "
                f"its {cfg.range_null} null (--range-detector requires it and says what it needs)"
            )
        if ranged is not None:
            range_info = _null_info(ranged.null, ranged.stats, cfg)
            report["range_detector"] = {
                "null": range_info,
                "clean_statistics": [float(v) for v in ranged.stats],
                "learning_images": ranged.n_learning,
                "maxima_images": ranged.n_inside,
                "scale_rank": scale_rank(ranged.n_inside),
                "output": RATIO_OUTPUT,
                "floor": RANGE_FLOOR,
                "scales": cfg.range_scales,
                "classes_with_own_scales": ranged.classes_with_own_scales,
                "class_floor": CLASS_FLOOR,
                "balance": ranged.balance,
                "ratio_columns": int(ranged.ratios.shape[1]),
                "sites": _range_summary(net, ranged.scales, ranged.heldout_site_ratios),
            }
        manifest = _manifest_fields(job, clean, cfg, null, null_info, report, diffs)
        if start_null is not None:
            manifest["start_detector"] = {
                "null": {**start_null.to_dict(), **_counts(start_info)},
                "bounds_from_iteration": 1,
                "combination": "p = min(1, 2 min(p_learned, p_start)); flag when p < alpha"
                if ranged is None
                else "Bonferroni: p = min(1, m min_i p_i) over the m statistics",
            }
        if ranged is not None:
            manifest["range_detector"] = {
                "output": RATIO_OUTPUT,
                "sites": len(net.sites),
                "null": {**ranged.null.to_dict(), **_counts(range_info)},
                "statistic": "max over bound sites of max_c(activation_c / clean scale_c); "
                f"clean scale_c: the {scale_rank(ranged.n_inside)}-th largest per-image maximum "
                f"over the {ranged.n_inside} correctly classified learning and held-out images, "
                f"at least {RANGE_FLOOR} x its site's median"
                + _class_scales_text(cfg.range_scales, ranged)
                + "; null fitted on every clean image's ratios against the others' scales "
                "(leave one out)",
                "scales": cfg.range_scales,
                "ratio_columns": int(ranged.ratios.shape[1]),
                "combination": "Bonferroni: p = min(1, m min_i p_i) over the m statistics",
            }
        manifest["onnx"]["bound_folding"] = fold_stats
        write_manifest(tmp, manifest)
        write_report(report, tmp)
    return CalibrationOutcome(job.out, report, manifest)


def _fit(stats: np.ndarray, kind: str, whose: str) -> Any:
    """The null of one statistic; a null that cannot be fitted stops calibration with a line."""
    try:
        return fit_null(stats, kind)  # type: ignore[arg-type]
    except ValueError as exc:  # e.g. every held-out statistic equal, or a tail of ties
        raise CalibrationError(
            f"cannot fit the {whose}{kind} null on the {len(stats)} held-out statistics: {exc}"
        ) from None


def _start_network(
    model: nn.Module, x_d: torch.Tensor, net: BoundedNetwork, mit: MitigationResult
) -> BoundedNetwork:
    """The network under the bounds MMAC's first iteration left (the start detector's)."""
    if mit.start_bounds is None:
        raise CalibrationError("the start detector needs at least one MMAC iteration")
    start = BoundedNetwork(model, x_d[:2])
    if start.sites != net.sites:
        raise CalibrationError("the start network's bound sites differ from the bounded one's")
    with torch.no_grad():
        for bound, value in zip(start.bounds(), mit.start_bounds, strict=True):
            bound.copy_(value)
    return start.eval()


@dataclass(frozen=True)
class RangeFit:
    """The range detector of a calibration: its network, the clean scales it divides by (over
    `n_inside` images), every clean image's ratios and statistic as the null sees them, and
    the null fitted on all of them (the learning images first, then the held-out ones)."""

    network: RangeNetwork
    scales: list[torch.Tensor]
    ratios: np.ndarray
    stats: np.ndarray
    n_learning: int
    n_inside: int
    null: Any
    classes_with_own_scales: list[int]
    balance: float | None  # what the class-conditional ratios are multiplied by, with both

    @property
    def heldout_ratios(self) -> np.ndarray:
        return self.ratios[self.n_learning :]

    @property
    def heldout_site_ratios(self) -> np.ndarray:
        """[N_held, S]: per site the larger of its groups' ratios."""
        held = self.heldout_ratios  # [N_held, groups x sites], one group per kind of scales
        return held.reshape(held.shape[0], -1, len(self.scales)).max(axis=1)

    @property
    def learning_stats(self) -> np.ndarray:
        return self.stats[: self.n_learning]


def fit_range_detector(
    net: BoundedNetwork, learn: CleanSet, held: CleanSet, cfg: CalibrationConfig
) -> RangeFit:
    """The range detector at `net`'s bound sites. Its clean scales: per channel the k-th
    largest (`clean_scales`) of the ORIGINAL network's per-image maxima (whatever bounds `net`
    holds now) over the clean images, learning and held-out, that it classifies correctly
    (read off the same forward passes): a misclassified clean image is one the network does not
    handle as it handles its class, and one such outlier among them can hide a trigger's
    channels. With `range_scales` "class" an image is measured against the scales of the class
    the network predicts for it (`inverse_tables`); with "both" (the default) against both
    kinds, the class ratios multiplied by `balance` and placed after the others. Every clean image
    then gets its ratios against those scales, without its own (leave one out), and the null
    (`gpd` tail shape at 0 or above) is fitted on all of them, misclassified ones included, as
    clean traffic has them."""
    images = torch.from_numpy(np.concatenate([learn.images, held.images]))
    per_image, logits = per_image_maxima(net, images, cfg.batch_size)
    predicted = logits.argmax(1).numpy()
    inside = predicted == np.concatenate([learn.labels, held.labels])
    scales = clean_scales(per_image, inside)
    k = int(logits.shape[1])
    groups, parts, weight = [], [], None
    if cfg.range_scales in ("global", "both"):
        groups.append(inverse_tables(per_image, inside))
        parts.append(leave_one_out_ratios(per_image, inside))
    if cfg.range_scales in ("class", "both"):
        tables = inverse_tables(per_image, inside, predicted, k)
        loo = leave_one_out_ratios(per_image, inside, predicted)
        if parts:  # beside the ratios over all classes: their clean tails put level
            weight = balance(range_statistic(parts[0]), range_statistic(loo))
            tables, loo = [t * weight for t in tables], loo * np.float32(weight)
        groups.append(tables)
        parts.append(loo)
    ratios = np.concatenate(parts, axis=1)
    stats = range_statistic(ratios)
    null = _fit(stats, cfg.range_null, "range detector's ")
    network = RangeNetwork(net, *groups)
    n_learning, n_inside = int(learn.labels.size), int(inside.sum())
    own = classes_with_own_scales(inside, predicted, k) if cfg.range_scales != "global" else []
    return RangeFit(network, scales, ratios, stats, n_learning, n_inside, null, own, weight)


def _class_scales_text(scales: str, ranged: RangeFit) -> str:
    """How the manifest's statistic line describes class-conditional scales."""
    if scales == "global":
        return ""
    own = (
        "; per predicted class (argmax of the logits): over that class's images (k-th "
        f"largest, k = ceil(n / 100)), at least {CLASS_FLOOR} x the scale over all classes "
        f"({len(ranged.classes_with_own_scales)} classes with their own)"
    )
    if scales == "class":
        return own
    return (
        "; twice: the first S columns against the scales over all classes, the next S against "
        f"those of the predicted class x {ranged.balance:.6g} (clean tails put level)" + own
    )


def _range_summary(
    net: BoundedNetwork, scales: list[torch.Tensor], ratios_held: np.ndarray
) -> list[dict[str, Any]]:
    """Per bound site: its channels' clean scales and the held-out images' ratios there."""
    rows = []
    for i, (site, u) in enumerate(zip(net.sites, scales, strict=True)):
        r = ratios_held[:, i]
        rows.append(
            {
                "site": site.follows,
                "channels": site.channels,
                "inactive_channels": int((u <= 0).sum()),
                "floored_channels": int(((u > 0) & (u < ratio_denominators(u))).sum()),
                "clean_scale_max": float(u.max()),
                "heldout_ratio_median": float(np.median(r)),
                "heldout_ratio_max": float(r.max()),
            }
        )
    return rows


def _null_info(null: Any, stats: np.ndarray, cfg: CalibrationConfig) -> dict[str, Any]:
    """A null as the report shows it: its parameters, sample size, level and threshold on d."""
    info = {
        **null.to_dict(),
        "n": int(stats.size),
        "alpha": cfg.alpha,
        "level": cfg.test_level,
        "threshold": _finite_or_none(threshold(null, cfg.test_level)),
    }
    info.pop("samples", None)
    return info


def _counts(info: dict[str, Any]) -> dict[str, Any]:
    return {"n": info["n"], "threshold": info["threshold"]}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _describe(src: ModelSource) -> str:
    if src.arch:
        return f"torchvision:{src.arch} weights={src.weights}"
    if src.factory:
        return f"factory:{src.factory} weights={src.weights}"
    return f"torchscript:{src.torchscript}"


def _flat_config(cfg: CalibrationConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    schedule = d.pop("schedule")
    return {**d, **{f"schedule.{k}": v for k, v in schedule.items()}}


def _manifest_fields(
    job: CalibrationJob,
    clean: CleanSet,
    cfg: CalibrationConfig,
    null: Any,
    null_info: dict[str, Any],
    report: dict[str, Any],
    diffs: dict[str, float],
) -> dict[str, Any]:
    norm = None
    if job.mean is not None:
        norm = {"mean": list(job.mean), "std": list(job.std or ()), "folded_into_graph": True}
    return {
        "name": job.name,
        "created_utc": report["created_utc"],
        "model_source": report["model"]["source"],
        "input": {
            "name": "input",
            "shape": list(clean.images.shape[1:]),
            "dtype": "FP32",
            "layout": "NCHW",
            "value_range": [0.0, 1.0],
            "accepts_uint8": True,
        },
        "output": {"name": "logits", "shape": [len(clean.class_names)], "dtype": "FP32"},
        "normalization": norm,
        "class_names": list(clean.class_names),
        "objective": cfg.objective,
        "hyperparameters": cfg.to_dict(),
        "null": {**null.to_dict(), **_counts(null_info)},
        "alpha": cfg.alpha,
        "decision": {
            "alpha": cfg.alpha,
            "flag_on_disagreement": cfg.flag_on_disagreement,
            "statistic": "d = m_c(x) - m_c(x;Z), c = argmax_k g_k(x)",
            "p_value": "gaussian: 1 - Phi((d - mu)/sigma); empirical: (1 + #{d_i >= d})/(n + 1)",
            "flag": "p < alpha"
            + (" (p combined with the start detector's)" if cfg.start_detector else "")
            + (" (p combined with the range detector's)" if cfg.range_detector else "")
            + (" or argmax g != argmax g(.;Z)" if cfg.flag_on_disagreement else ""),
            "correction": "argmax_{k != c} g_k(x;Z)",
        },
        "bounds": [{k: v for k, v in row.items() if k != "values"} for row in report["bounds"]],
        "heldout": report["heldout"],
        "split": report["split"],
        "mmbd": report["mmbd"],
        "onnx": {
            "opset": OPSET,
            "max_diff": diffs,
            "tolerance": TOLERANCE,
            "rule": "per output: max |onnxruntime - torch| <= tolerance * max(1, max |torch|)",
        },
        "versions": library_versions(),
    }
