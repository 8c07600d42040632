"""Calibration hyperparameters: one frozen dataclass, validated once, recorded in the manifest.

Torch-free so that the command line can be parsed without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from calibrate.errors import CalibrationError
from guard.mmdf import NULL_KINDS, NullKind, gpd_min_samples

Objective = Literal["mmac", "mmom"]
MaximaSource = Literal["bounded", "original"]
RANGE_SCALES = ("both", "class", "global")


def _check(ok: bool, name: str, value: object, rule: str = "") -> None:
    """Refuse a setting, naming it, its value and (`rule`) what it must be."""
    if not ok:
        why = f" ({rule})" if rule else ""
        raise CalibrationError(f"invalid value for {name}: {value!r}{why}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Refuse a setting that is not one of `choices`, naming them."""
    _check(value in choices, name, value, "one of " + ", ".join(choices))


@dataclass(frozen=True)
class ScheduleConfig:
    """How the alternation between margin ascent and bound descent runs (SPEC section 2)."""

    # maxima come from the bounded network (the paper) or the original one ([code])
    mm_source: MaximaSource = "bounded"
    # at most this many alternation iterations; stop earlier once the loss settles
    max_iters: int = 80
    # never stop before this many iterations (the lambda controller needs some)
    min_iters: int = 50
    # MMAC at max_iters below its agreement target: go on for at most this many iterations,
    # stopping as soon as the target is met again (the controller is still pulling it back);
    # a run still below it then returns the bounds of the last iteration that met it
    overtime_iters: int = 40
    # stop when |loss_t - loss_{t-1}| <= loss_rel_tol * |loss_{t-1}| (0: run max_iters)
    loss_rel_tol: float = 1e-3
    # ascent steps from uniform random starts for a fresh draw of maxima (the pipeline seeds
    # mm_source=bounded with the MM-BD maxima instead)
    cold_ascent_steps: int = 40
    # mm_source=bounded: ascent steps per iteration, warm-started from the previous maxima
    warm_ascent_steps: int = 1
    # mm_source=original: re-draw the maxima from fresh random starts every this many iterations
    redraw_every: int = 100
    # ascent optimiser: adam (scale-free, default) or sgd (the reference's plain ascent)
    ascent_optimizer: Literal["adam", "sgd"] = "adam"
    # ascent step size, in [0,1] pixel units
    ascent_lr: float = 0.02
    # Adam learning rate on the bounds
    bound_lr: float = 0.05
    # scale each layer's bound learning rate by that layer's mean initial bound, so the step is
    # a fraction of the activation scale and the default fits networks of any activation size
    bound_lr_relative: bool = True
    # lambda (weight of the mean max-margin term) at the start
    lambda_init: float = 0.4
    # MMOM's fixed lambda (MMOM has no controller, SPEC 3). MMAC's starting 0.4 lets the margin
    # term swamp the cross-entropy term: on a long-tail (ratio 100) CIFAR-10 model it cost 18.6
    # points of test accuracy, where 0.04 gained 7.9 (docs/RESULTS.md)
    mmom_lambda: float = 0.04
    # lambda controller: first update after this many iterations, then every lambda_every.
    # [code] uses 30 and 10 over 300 iterations; a schedule of ~80 iterations needs the same
    # controller to act sooner and more often to hold the agreement target (REFERENCE_SCHEDULE
    # keeps 30 and 10)
    lambda_warmup: int = 10
    lambda_every: int = 5
    lambda_factor: float = 1.2

    def __post_init__(self) -> None:
        _check_choice("mm_source", self.mm_source, ("bounded", "original"))
        _check_choice("ascent_optimizer", self.ascent_optimizer, ("adam", "sgd"))
        _check(self.max_iters >= 1, "max_iters", self.max_iters, "at least 1")
        min_ok = 0 <= self.min_iters <= self.max_iters
        _check(min_ok, "min_iters", self.min_iters, f"0 to max_iters, {self.max_iters}")
        _check(self.overtime_iters >= 0, "overtime_iters", self.overtime_iters, "0 or more")
        _check(self.loss_rel_tol >= 0, "loss_rel_tol", self.loss_rel_tol, "0 or more")
        _check(
            self.cold_ascent_steps >= 0, "cold_ascent_steps", self.cold_ascent_steps, "0 or more"
        )
        _check(
            self.warm_ascent_steps >= 0, "warm_ascent_steps", self.warm_ascent_steps, "0 or more"
        )
        _check(self.redraw_every >= 1, "redraw_every", self.redraw_every, "at least 1")
        _check(self.ascent_lr > 0, "ascent_lr", self.ascent_lr, "above 0")
        _check(self.bound_lr > 0, "bound_lr", self.bound_lr, "above 0")
        init_ok = self.lambda_init >= 0 and math.isfinite(self.lambda_init)
        _check(init_ok, "lambda_init", self.lambda_init, "a finite number, 0 or more")
        mmom_ok = self.mmom_lambda >= 0 and math.isfinite(self.mmom_lambda)
        _check(mmom_ok, "mmom_lambda", self.mmom_lambda, "a finite number, 0 or more")
        _check(self.lambda_every >= 1, "lambda_every", self.lambda_every, "at least 1")
        _check(self.lambda_factor > 1, "lambda_factor", self.lambda_factor, "above 1")


#: SPEC section 2's reference schedule: 300 iterations, maxima from the original network by
#: 300 cold plain-ascent steps (lr 0.01), re-drawn every 100 iterations, Adam lr 0.1 on the bounds.
REFERENCE_SCHEDULE = ScheduleConfig(
    mm_source="original",
    max_iters=300,
    min_iters=300,
    overtime_iters=0,
    loss_rel_tol=0.0,
    cold_ascent_steps=300,
    warm_ascent_steps=0,
    redraw_every=100,
    ascent_optimizer="sgd",
    ascent_lr=0.01,
    bound_lr=0.1,
    bound_lr_relative=False,
    lambda_warmup=30,
    lambda_every=10,
)


#: Detection first: the alternation stops after its first iteration, so every bound stays near
#: its channel's largest activation on the clean learning images (one MMAC step from
#: `bound_init = max`). On the CIFAR-10 benchmark these bounds caught WaNet and all-to-all
#: triggers far better than the learned ones, and the chessboard and Blended far worse; pair them
#: with `null = "gpd"`, whose tail fits their statistic (docs/RESULTS.md).
DETECT_SCHEDULE = ScheduleConfig(max_iters=1, min_iters=0, overtime_iters=0)


DEFAULT_NULL: NullKind = "gpd"
"""The learned statistic's null where the held-out images carry it (`CalibrationConfig.null`)."""
FALLBACK_NULL: NullKind = "yeojohnson"
"""Its null where they do not: fewer than `DEFAULT_NULL` needs."""


def gpd_min_heldout() -> int:
    """The fewest held-out images that carry a gpd null with no other statistics: the report's
    cross-fitted false-positive rate fits one on each half of them (`null_size_problem`)."""
    return 2 * gpd_min_samples()


def null_size_problem(
    kind: NullKind, n_heldout: int, level: float, n_always: int = 0
) -> str | None:
    """Why `n_heldout` held-out statistics cannot carry a null of `kind` tested at `level`, or
    None: a gpd tail is fitted on each half of them (the report's cross-fitted false-positive
    rate), and an empirical null's smallest p-value, 1/(n+1), must get below the level.
    `n_always`: statistics of other clean images that the null and each half's fit also have
    (the range detector's leave-one-out statistics of the learning images)."""
    need = gpd_min_samples()
    if kind == "gpd" and n_heldout // 2 + n_always < need:
        if not n_always:
            return (
                f"gpd null needs at least {gpd_min_heldout()} held-out images (the report's "
                f"false-positive rate fits one on each half), got {n_heldout}"
            )
        return (
            f"gpd null needs at least {need} clean images in each fit (the report's "
            f"false-positive rate fits one on the {n_always} learning images and each half of "
            f"the {n_heldout} held-out ones), got {n_always + n_heldout // 2}"
        )
    n = n_heldout + n_always
    if kind == "empirical" and (n + 1) * level <= 1:
        images = "held-out images" if not n_always else "clean images"
        return (
            f"empirical null from {n} {images} cannot give p < {level} (its smallest p-value "
            f"is 1/{n + 1})"
        )
    return None


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything that decides the bounds, the null and the decision rule."""

    objective: Objective = "mmac"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # bound initialisation: "max" (per-channel clean maximum) or a constant
    bound_init: str = "max"
    # "max": a bound never rises above its channel's maximum activation on the clean learning
    # set (a higher bound leaves the clean set unchanged and lets a trigger's large activations
    # through); "none": SPEC 1's bounds, kept >= 0 only. Off by default: on the WaNet benchmark
    # models it cut guarded ASR from 77% to 44% on one and raised it from 9.6% to 36% on
    # another (docs/RESULTS.md)
    bound_ceiling: Literal["max", "none"] = "none"
    # lambda controller's clean-agreement target (MMAC only; MMOM keeps lambda fixed)
    target_agreement: float = 0.95
    # J: ascent starts per class; 0 means the number of clean learning images per class
    starts_per_class: int = 0
    # MMAC: keep only clean images the original network classifies correctly ([code])
    correct_only: bool = True
    # held-out share of the clean set (null + report figures); the rest learns the bounds
    heldout_fraction: float = 0.4
    # MMDF null of the learned statistic: gpd (conformal body, generalized Pareto tail over the
    # held-out 80th percentile, its shape at 0 or above: guard.mmdf.GPD_SHAPE_FLOOR),
    # yeojohnson (a Gaussian of the Yeo-Johnson-transformed statistic), gaussian (SPEC 4.3's,
    # a Gaussian of d itself) or empirical (conformal p-values). None (the default): gpd where
    # the held-out images carry it (`null_size_problem`: 100 of them, so that the report's
    # false-positive rate can fit one on each half), else yeojohnson. The clean statistic is
    # right-skewed with a long tail: beside the range detector, on 18 CIFAR-10 benchmark models
    # Yeo-Johnson flagged over 1% of clean inputs on four (the Gaussian on ten of twelve), the
    # floored gpd on none, 0.09-0.68% (docs/RESULTS.md).
    null: NullKind | None = None
    # a second detection statistic: d under the bounds as MMAC's first iteration left them (each
    # channel near its clean maximum), exported as a third network, under its own null
    # (`start_null`); the guard flags when either p-value is below alpha / 2 (Bonferroni) and
    # still corrects with the learned bounds. MMAC only. Off by default: a third forward pass
    # per input. On the CIFAR-10 benchmark it took the WaNet and all-to-all triggers the
    # learned bounds miss (full-width WaNet 23.4% -> 2.2% guarded ASR) and kept the chessboard,
    # Blended and SIG, which the start bounds alone miss, at or under 0.15% (docs/RESULTS.md).
    start_detector: bool = False
    # the start statistic's null: a point mass near 0 and a long tail, which only `gpd` fitted
    # (held-out clean FPR <= 1% on 9 of 11 benchmark models; `yeojohnson` over 1% on 10)
    start_null: NullKind = "gpd"
    # a detection statistic with no extra network: per bound site, the largest activation of
    # the ORIGINAL network relative to its channel's clean scale (about the 99th percentile of
    # its per-image maxima over the correctly classified clean images); the
    # statistic is the largest over the sites (guard.mmdf.range_statistic), under its own null
    # (`range_null`). original.onnx gets it as a second output, so each request still costs
    # two forward passes. Combined with the learned statistic's p-value by Bonferroni (each at
    # alpha / 2). Its null is fitted on every clean image's statistic against the others'
    # scales (leave one out). None (the default): on when the clean images are enough for
    # that null (`resolve`), else off and the report says why. On the CIFAR-10 benchmark it took
    # full-width WaNet (poisoned per batch) from 10.1% to 0.6% guarded ASR and lowered the
    # clean FPR on most models (docs/RESULTS.md).
    range_detector: bool | None = None
    # its null: a body near 1 and a right tail, like the start statistic's; a `gpd` tail's shape
    # is held at 0 or above, as every null's is (guard.mmdf.GPD_SHAPE_FLOOR)
    range_null: NullKind = "gpd"
    # whose clean scales an input's activations are measured against: `global`, those of all
    # clean images (the only kind until stop 25); `class`, those of the clean images of the
    # class the network predicts for it (each channel's scale at least half its scale over
    # all classes: calibrate.rangeprobe.CLASS_FLOOR); `both`, the larger of the two
    # statistics, the class one rescaled so that the two clean tails meet
    # (calibrate.rangeprobe.balance). On the CIFAR-10 benchmark the class scales caught more
    # WaNet and all-to-all inputs and fewer chessboard and Blended ones; both kept most of each
    # (docs/RESULTS.md).
    range_scales: str = "both"
    # MMDF flags inputs with p < alpha
    alpha: float = 0.005
    # also flag when the original and bounded decisions differ
    flag_on_disagreement: bool = False
    # MM-BD: random starts per class and at most this many ascent steps (SPEC 5's 300; a class
    # stops earlier once its summed margin changes by < 1e-5 relatively). Not fewer: some
    # classes climb late. On the full-width all-to-all benchmark model class 7's best margin
    # from 10 starts was 0.96 after 100 Adam steps and 17.1 after 300 (others: 14-37 at 100).
    mmbd_starts: int = 30
    mmbd_steps: int = 300
    mmbd_alpha: float = 0.05
    # forward/backward chunk size (memory only; results do not depend on it)
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, ("mmac", "mmom"))
        if self.bound_init != "max":
            try:
                ok = float(self.bound_init) > 0
            except ValueError:
                ok = False
            _check(ok, "bound_init", self.bound_init, "'max' or a positive number")
        _check_choice("bound_ceiling", self.bound_ceiling, ("max", "none"))
        _check(
            0 < self.target_agreement <= 1,
            "target_agreement",
            self.target_agreement,
            "above 0 and at most 1",
        )
        _check(
            self.starts_per_class >= 0,
            "starts_per_class",
            self.starts_per_class,
            "0 (as many as the smallest class has) or more",
        )
        _check(
            0 < self.heldout_fraction < 1,
            "heldout_fraction",
            self.heldout_fraction,
            "between 0 and 1",
        )
        if self.null is not None:
            _check_choice("null", self.null, NULL_KINDS)
        _check_choice("start_null", self.start_null, NULL_KINDS)
        _check_choice("range_null", self.range_null, NULL_KINDS)
        _check_choice("range_scales", self.range_scales, RANGE_SCALES)
        if self.start_detector and self.objective != "mmac":
            raise CalibrationError("a start detector is for objective 'mmac', not 'mmom'")
        _check(0 < self.alpha < 1, "alpha", self.alpha, "between 0 and 1")
        _check(self.mmbd_starts >= 1, "mmbd_starts", self.mmbd_starts, "at least 1")
        _check(self.mmbd_steps >= 1, "mmbd_steps", self.mmbd_steps, "at least 1")
        _check(0 < self.mmbd_alpha < 1, "mmbd_alpha", self.mmbd_alpha, "between 0 and 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def range_detector_fits(self, n_heldout: int, n_learning: int = 0) -> bool:
        """Whether the clean images can carry the range detector's null at its level
        (`null_size_problem`): it is fitted on the `n_learning` learning images' leave-one-out
        statistics and the `n_heldout` held-out images'. The learned statistic's own null is
        checked in calibration, and refused, not skipped."""
        level = dataclasses.replace(self, range_detector=True).test_level
        return (
            n_heldout >= 2
            and null_size_problem(self.range_null, n_heldout, level, n_learning) is None
        )

    def resolve(self, n_heldout: int, n_learning: int = 0) -> CalibrationConfig:
        """This config with what the clean images decide filled in: `range_detector` None
        becomes whether its null fits, then `null` None becomes `DEFAULT_NULL` where the
        `n_heldout` held-out images carry it, else `FALLBACK_NULL`."""
        cfg = self
        if cfg.range_detector is None:
            fits = cfg.range_detector_fits(n_heldout, n_learning)
            cfg = dataclasses.replace(cfg, range_detector=fits)
        if cfg.null is None:
            fits = null_size_problem(DEFAULT_NULL, n_heldout, cfg.test_level) is None
            cfg = dataclasses.replace(cfg, null=DEFAULT_NULL if fits else FALLBACK_NULL)
        return cfg

    @property
    def null_kind(self) -> NullKind:
        """The learned statistic's null. Needs `null` decided (`resolve`)."""
        if self.null is None:
            raise CalibrationError("null is undecided: resolve() the config first")
        return self.null

    @property
    def test_level(self) -> float:
        """Each statistic's own flagging level: alpha / m for m statistics (Bonferroni): 1, plus
        one for a start detector and one for a range detector. Needs `range_detector` decided
        (`resolve`)."""
        if self.range_detector is None:
            raise CalibrationError("range_detector is undecided: resolve() the config first")
        return self.alpha / (1 + int(self.start_detector) + int(self.range_detector))
