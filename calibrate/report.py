"""The human-facing calibration report: `report.json`, `report.md` and a few PNG figures.

Pure data in, files out: `write_report` takes the plain dict the calibration command has already
assembled and only renders it, so the report can be re-rendered from a saved `report.json`
without torch or the model. Figures are drawn on `matplotlib.figure.Figure` objects directly
(no pyplot) so that no global backend or figure registry is touched and nothing leaks between
calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_DPI = 120
_MAX_STRIP_POINTS = 400  # per site; more points only make the strip a solid smear
_LOG_SPAN = 100.0  # bound values spanning more than this factor get a log y axis

_BEFORE_COLOR = "#4c72b0"
_AFTER_COLOR = "#dd8452"
_ALERT_COLOR = "#c44e52"

__all__ = ["sanitise", "write_report"]


def write_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write `report.json`, `report.md` and the figures into `out_dir`; return the paths written.

    The report is sanitised first (NaN/inf become null, anything that is not a plain JSON type
    raises `TypeError` naming its key) so a bad report fails before any file is written, and
    so the JSON on disk is strict JSON that any reader accepts. `history.png` is only drawn
    when there is a history; a stale one from an earlier run in the same folder is left alone
    and is not linked from the markdown.
    """
    clean = sanitise(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    figures: list[Path] = []
    plots: list[tuple[str, Callable[[Mapping[str, Any]], Figure]]] = [
        ("margins.png", _margins_figure),
        ("statistic.png", _statistic_figure),
        ("bounds.png", _bounds_figure),
    ]
    if clean.get("history"):
        plots.append(("history.png", _history_figure))
    for name, draw in plots:
        path = out_dir / name
        draw(clean).savefig(path, dpi=_DPI)
        figures.append(path)

    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(clean, [p.name for p in figures]), encoding="utf-8")
    json_path = out_dir / "report.json"
    text = json.dumps(clean, indent=2, sort_keys=False, allow_nan=False)
    json_path.write_text(text + "\n", encoding="utf-8")
    return [json_path, md_path, *figures]


# --------------------------------------------------------------------------- sanitising


def sanitise(value: Any, key: str = "report") -> Any:
    """Return a copy of `value` with non-finite floats as None and tuples as lists.

    `json.dumps` would otherwise write `NaN`/`Infinity`, which is not JSON and breaks strict
    readers (browsers, jq). Anything outside plain JSON types (numpy arrays and integers,
    tensors, paths) raises `TypeError` naming the offending key, because silently coercing it
    would hide a bug in whoever built the report.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{key}: key {k!r} is {type(k).__name__}, not str")
            out[k] = sanitise(v, f"{key}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [sanitise(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{key}: {type(value).__name__} is not JSON-serialisable (plain types only)")


# --------------------------------------------------------------------------- formatting


def _finite(x: Any) -> float | None:
    """The value as a finite float, or None for missing/NaN/inf/non-numbers."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _num(x: Any, digits: int = 4) -> str:
    """A number in `digits` significant digits; integers as-is; "n/a" when not finite."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    v = _finite(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def _pct(x: Any) -> str:
    """A fraction as a percentage with two decimals."""
    v = _finite(x)
    return "n/a" if v is None else f"{100.0 * v:.2f}%"


def _pval(x: Any) -> str:
    """A p-value in three significant digits, scientific below 1e-3 where decimals get long."""
    v = _finite(x)
    if v is None:
        return "n/a"
    if v == 0.0:
        return "0"
    return f"{v:.2e}" if v < 1e-3 else f"{v:.3g}"


def _seconds(x: Any) -> str:
    """Seconds, with minutes alongside once it is long enough for seconds to be hard to read."""
    v = _finite(x)
    if v is None:
        return "n/a"
    return f"{v:.1f} s ({v / 60.0:.1f} min)" if v >= 120.0 else f"{v:.2f} s"


def _cell(x: Any) -> str:
    """Any plain value as a markdown table cell: pipes escaped, containers compacted."""
    if isinstance(x, bool):
        text = "true" if x else "false"
    elif x is None:
        text = "n/a"
    elif isinstance(x, (int, float)):
        text = _num(x)
    elif isinstance(x, str):
        text = x
    else:
        text = json.dumps(x, separators=(",", ":"))
        text = text if len(text) <= 80 else text[:77] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _class_names(report: Mapping[str, Any], k: int) -> list[str]:
    """Class names from the model section, falling back to indices when absent or mismatched."""
    names = report.get("model", {}).get("class_names") or []
    if len(names) != k:
        return [f"class {i}" for i in range(k)]
    return [str(n) for n in names]


def _num_classes(report: Mapping[str, Any]) -> int:
    """K from the per-class arrays (they, not `num_classes`, are what gets drawn)."""
    mm = report.get("max_margins", {})
    lengths = [len(mm.get("before") or []), len(mm.get("after") or [])]
    lengths.append(len(report.get("mmbd", {}).get("r") or []))
    return max(lengths) if any(lengths) else int(report.get("model", {}).get("num_classes", 0))


def _target_name(report: Mapping[str, Any]) -> str:
    """Name of the MM-BD target class, or a readable placeholder when it is out of range."""
    target = report.get("mmbd", {}).get("target")
    names = _class_names(report, _num_classes(report))
    if isinstance(target, int) and 0 <= target < len(names):
        return names[target]
    return f"class {target}"


def _verdict(report: Mapping[str, Any]) -> str:
    """The one-line MM-BD verdict shared by the markdown and the margins figure title."""
    mmbd = report.get("mmbd", {})
    p = _pval(mmbd.get("p_value"))
    if mmbd.get("suspected"):
        return f"backdoor suspected, target class {_target_name(report)} (p = {p})"
    return f"no backdoor detected (p = {p})"


# --------------------------------------------------------------------------- markdown


def _markdown(report: Mapping[str, Any], figures: Sequence[str]) -> str:
    """The whole `report.md`: verdict first, then the evidence, then the figures."""
    lines = [f"# MMGuard calibration report: {report.get('model_name', 'unnamed model')}", ""]
    lines += _md_verdict(report)
    lines += _md_overview(report)
    lines += _md_heldout(report)
    lines += _md_split(report)
    lines += _md_null(report)
    lines += _md_start_detector(report)
    lines += _md_range_detector(report)
    lines += _md_classes(report)
    lines += _md_bounds(report)
    lines += _md_key_values("Configuration", report.get("config") or {}, _cell)
    lines += _md_key_values("Timing", _timing_ordered(report.get("timing_s") or {}), _seconds)
    if report.get("device"):
        lines += [f"Calibrated on {report['device']} (export on the CPU).", ""]
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            lines += [f"![{name.removesuffix('.png')}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def null_fit_advice(report: Mapping[str, Any]) -> str | None:
    """A hint when a Gaussian null visibly misfits: its cross-fit held-out false-positive rate
    is above twice alpha (SPEC 4: the nominal rate holds only if the null fits)."""
    null = report.get("null", {})
    fpr = report.get("heldout", {}).get("false_positive_rate")
    alpha = null.get("alpha")
    if null.get("kind") != "gaussian" or fpr is None or alpha is None or fpr <= 2 * alpha:
        return None
    return (
        f"the Gaussian null flags {_pct(fpr)} of held-out clean images against a nominal "
        f"{_pct(alpha)}: the clean statistic is skewed; `--null yeojohnson` (or `--null "
        "empirical`, given at least 1/alpha held-out images) fits it better"
    )


LOW_ACCURACY_SHARE = 0.25
"""The report warns when the original network's accuracy on the clean set is less than this
share of the way from chance (1 / K) to 100%: 32.5% for 10 classes, 26.7% for 43. A network a
user deploys does far better on its own task; one that does this badly on the clean set is
almost always being fed images it was not trained on (another normalisation, image size or
class order), and every figure of the calibration is then about the wrong inputs."""
DOMINANT_SHARE = 0.5
"""The report also warns when the original network sends at least this share of the
(balanced) clean set to one class, with 3 classes or more: mismatched preprocessing often
collapses the predictions onto one class, and so would a trigger already in the clean images."""


def clean_set_advice(report: Mapping[str, Any]) -> str | None:
    """A warning when the original network does so badly on the clean set, or sends so much of
    it to one class, that the inputs are likely not what it was trained on (`LOW_ACCURACY_SHARE`,
    `DOMINANT_SHARE`), or when it returns probabilities instead of logits; None otherwise, and
    for a report without the clean-set figures."""
    c = report.get("clean_set")
    if not c:
        return None
    parts = []
    if c.get("outputs_are_probabilities"):
        parts.append(
            "the model returns probabilities (every output in [0, 1], each row summing to 1), "
            "not logits: margins between probabilities are squeezed into [-1, 1], and neither "
            "the bounds nor the statistic work as designed on them; calibrate the network "
            "without its final softmax"
        )
    chance, acc, share = c["chance"], c["accuracy_original"], c["most_predicted_share"]
    low = acc < chance + LOW_ACCURACY_SHARE * (1.0 - chance)
    dominant = chance <= 1 / 3 and share >= DOMINANT_SHARE
    if low or dominant:
        names = _class_names(report, _num_classes(report))
        top = c["most_predicted_class"]
        top_name = names[top] if 0 <= top < len(names) else str(top)
        parts.append(
            f"the original network classifies {_pct(acc)} of the {c['images']} clean images "
            f"correctly (chance {_pct(chance)}) and predicts {top_name} for {_pct(share)} of "
            "them: check that --mean/--std, --image-size and the class order (the data's class "
            "names, sorted as folder names sort) match how the model was trained, and that the "
            "clean images carry no trigger; until then the calibration's figures describe the "
            "wrong inputs"
        )
    return "; and ".join(parts) if parts else None


def _md_verdict(report: Mapping[str, Any]) -> list[str]:
    """Verdict paragraph: the MM-BD decision, then what the runtime guard costs on clean data."""
    mmbd = report.get("mmbd", {})
    held = report.get("heldout", {})
    null = report.get("null", {})
    first = f"**MM-BD: {_verdict(report)}**, at alpha = {_num(mmbd.get('alpha'))}."
    second = (
        f"The runtime guard (alpha = {_num(null.get('alpha'))}) flags "
        f"{_pct(held.get('false_positive_rate'))} of clean held-out images "
        f"({_pct(held.get('false_positive_rate_with_disagreement'))} counting "
        f"original/bounded disagreements); accuracy is {_pct(held.get('accuracy_original'))} "
        f"original, {_pct(held.get('accuracy_guarded'))} guarded."
    )
    advice = null_fit_advice(report)
    tail = [f"Note: {advice}.", ""] if advice else []
    warning = clean_set_advice(report)
    head = [f"**Warning: {warning}.**", ""] if warning else []
    return [*head, f"{first} {second}", "", *tail]


def _md_overview(report: Mapping[str, Any]) -> list[str]:
    """Where the model came from and what was calibrated."""
    model = report.get("model", {})
    shape = model.get("input_shape")
    rows = [
        ["Model source", _cell(model.get("source"))],
        ["Classes", _cell(model.get("num_classes"))],
        ["Input shape", "×".join(str(s) for s in shape) if shape else "n/a"],
        ["Objective", _cell(report.get("objective"))],
        ["Created (UTC)", _cell(report.get("created_utc"))],
        ["Schema version", _cell(report.get("schema_version"))],
    ]
    return ["## Overview", "", *_table(["Item", "Value"], rows), ""]


def _md_heldout(report: Mapping[str, Any]) -> list[str]:
    """Held-out accuracy and false-positive figures: the cost of deploying the guard."""
    held = report.get("heldout", {})
    rows = [
        ["Accuracy, original network", _pct(held.get("accuracy_original"))],
        ["Accuracy, bounded network", _pct(held.get("accuracy_bounded"))],
        ["Accuracy, guarded (flagged counted wrong)", _pct(held.get("accuracy_guarded"))],
        ["Original/bounded agreement", _pct(held.get("agreement"))],
        ["False-positive rate", _pct(held.get("false_positive_rate"))],
        [
            f"False-positive rate, 95% upper bound over {held.get('n')} images (Clopper-Pearson)",
            _pct(held.get("false_positive_rate_upper95")),
        ],
        [
            "False-positive rate with disagreement rule",
            _pct(held.get("false_positive_rate_with_disagreement")),
        ],
        ["FPR method", _cell(held.get("fpr_method"))],
    ]
    return ["## Held-out evaluation", "", *_table(["Metric", "Value"], rows), ""]


def _md_split(report: Mapping[str, Any]) -> list[str]:
    """How the clean data was split between learning the bounds and measuring them."""
    split = report.get("split", {})
    rows = [
        ["Seed", _cell(split.get("seed"))],
        ["Held-out fraction", _pct(split.get("heldout_fraction"))],
        ["Learn images", _cell(split.get("learn"))],
        ["Learn images used", _cell(split.get("learn_used"))],
        ["Learn images dropped (misclassified)", _cell(split.get("learn_dropped_misclassified"))],
        ["Held-out images", _cell(split.get("heldout"))],
    ]
    return ["## Data split", "", *_table(["Item", "Value"], rows), ""]


_NULL_EXTRAS = (
    ("lmbda", "Yeo-Johnson exponent"),
    ("tail_u", "Tail threshold u"),
    ("tail_zeta", "Share above u"),
    ("tail_xi", "Tail shape xi"),
    ("tail_beta", "Tail scale beta"),
)


def _class_scales_sentence(ranged: dict[str, Any]) -> str:
    scales = ranged.get("scales")
    if scales not in ("class", "both"):
        return ""
    own = (
        "the scales of the class the network predicts for it, over that class's images alone "
        f"(each at least {_cell(ranged.get('class_floor'))} times the scale over all classes; "
        f"{len(ranged.get('classes_with_own_scales') or [])} classes have scales of their own, "
        "the others use those over all classes)"
    )
    if scales == "class":
        return "; an input is measured against " + own
    return (
        "; an input is measured twice, against the scales over all classes and against "
        + own
        + f", the second ratio multiplied by {_cell(ranged.get('balance'))} so that the two "
        "statistics' clean 95th percentiles meet, and the larger counts"
    )


def _null_rows(null: Mapping[str, Any], statistic: str = "d") -> list[list[str]]:
    """A fitted null as the report shows it: parameters, sample size, level, threshold on the
    statistic."""
    rows = [
        ["Kind", _cell(null.get("kind"))],
        ["mu", _num(null.get("mu"))],
        ["sigma", _num(null.get("sigma"))],
        ["Samples (n)", _cell(null.get("n"))],
        *[[label, _num(null[key])] for key, label in _NULL_EXTRAS if key in null],
        ["alpha", _num(null.get("alpha"))],
    ]
    level, alpha = null.get("level"), null.get("alpha")
    if level not in (None, alpha):  # start and range detectors share alpha (Bonferroni)
        m = round(alpha / level) if isinstance(alpha, (int, float)) and level else "m"
        rows.append([f"Level (alpha / {m})", _num(level)])
    rows.append([f"Threshold on {statistic}", _num(null.get("threshold"))])
    return rows


def _md_null(report: Mapping[str, Any]) -> list[str]:
    """The null distribution of the detection statistic and the resulting threshold."""
    null = report.get("null", {})
    rows = _null_rows(null)
    gamma = report.get("mmbd", {}).get("gamma") or {}
    gamma_text = ", ".join(f"{k} = {_num(v)}" for k, v in gamma.items()) or "n/a"
    chosen = null.get("chosen")
    return [
        "## Detection null",
        "",
        *([f"The null is {chosen}.", ""] if chosen else []),
        *_table(["Parameter", "Value"], rows),
        "",
        f"MM-BD Gamma fit on the non-maximum classes: {gamma_text}.",
        "",
    ]


def _md_start_detector(report: Mapping[str, Any]) -> list[str]:
    """The start detector's null, when the artifact has one (`--start-detector`)."""
    start = report.get("start_detector")
    if not start:
        return []
    rows = _null_rows(start.get("null", {}))
    return [
        "## Start detector",
        "",
        "A second statistic, d under the bounds as MMAC's iteration "
        f"{_cell(start.get('bounds_from_iteration'))} left them (each channel near its largest "
        "clean activation), served as a third network. The guard flags when any statistic's "
        "p-value is below alpha / m (m statistics in all) and corrects with the learned bounds; "
        "the held-out false-positive rates above are the combined rule's.",
        "",
        *_table(["Parameter", "Value"], rows),
        "",
    ]


def _ordinal(k: Any) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th"; anything but an int as the report cell shows it."""
    if not isinstance(k, int) or isinstance(k, bool):
        return _cell(k)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _md_range_detector(report: Mapping[str, Any]) -> list[str]:
    """The range detector's null and per-site figures (`--range-detector`)."""
    ranged = report.get("range_detector")
    if not ranged:
        off = report.get("range_detector_off")
        return ["## Range detector", "", f"{off[:1].upper()}{off[1:]}.", ""] if off else []
    sites = ranged.get("sites") or []
    site_rows = [
        [
            _cell(row.get("site")),
            _cell(row.get("channels")),
            _cell(row.get("inactive_channels")),
            _cell(row.get("floored_channels")),
            _cell(row.get("heldout_ratio_median")),
            _cell(row.get("heldout_ratio_max")),
        ]
        for row in sites
    ]
    return [
        "## Range detector",
        "",
        "A statistic read off the original network's own forward pass (its output "
        f"`{_cell(ranged.get('output'))}`): per bound site, the largest activation relative to "
        "its channel's clean scale, the "
        f"{_ordinal(ranged.get('scale_rank'))} largest of its per-image maxima over the "
        f"{_cell(ranged.get('maxima_images'))} clean images, learning and held-out, that the "
        "network classifies correctly (raised to at least "
        f"{_cell(ranged.get('floor'))} times the median over the site's active channels: the "
        "floored ones)"
        + _class_scales_sentence(ranged)
        + "; the statistic is the largest over the sites. Its null is fitted on "
        "every clean image's statistic against the other images' scales (leave one out), "
        "as a new clean image's is against all of them. The guard flags when any "
        "statistic's p-value is below alpha / m (m statistics in all) and corrects with the "
        "learned bounds; the held-out false-positive rates above are the combined rule's.",
        "",
        *_table(["Parameter", "Value"], _null_rows(ranged.get("null", {}), "the ratio")),
        "",
        *_table(
            [
                "Site",
                "Channels",
                "Inactive on clean",
                "Floored",
                "Held-out ratio (vs the others), median",
                "max",
            ],
            site_rows,
        ),
        "",
    ]


def _md_classes(report: Mapping[str, Any]) -> list[str]:
    """Per-class MM-BD statistic and maximum margins, with the MM-BD target marked."""
    k = _num_classes(report)
    names = _class_names(report, k)
    r = report.get("mmbd", {}).get("r") or []
    mm = report.get("max_margins", {})
    before, after = mm.get("before") or [], mm.get("after") or []
    split = report.get("split", {})
    learn, held = split.get("learn_per_class") or [], split.get("heldout_per_class") or []
    target = report.get("mmbd", {}).get("target")

    def at(values: Sequence[Any], i: int) -> Any:
        return values[i] if i < len(values) else None

    rows = []
    for i in range(k):
        name = _cell(names[i])
        name = f"**{name}** (MM-BD target)" if i == target else name
        nums = [at(r, i), at(before, i), at(after, i)]
        rows.append(
            [str(i), name, *(_num(v) for v in nums), _cell(at(learn, i)), _cell(at(held, i))]
        )
    header = ["#", "Class", "r_k", "Max margin before", "Max margin after", "Learn", "Held-out"]
    return ["## Per-class maximum margins", "", *_table(header, rows), ""]


def _md_bounds(report: Mapping[str, Any]) -> list[str]:
    """Summary of the learned bounds per ReLU site; the raw values stay in report.json."""
    rows = [
        [
            _cell(b.get("site")),
            _cell(b.get("kind")),
            _cell(b.get("channels")),
            _num(b.get("init_max")),
            _num(b.get("final_mean")),
            _num(b.get("final_min")),
            _num(b.get("final_max")),
            _pct(b.get("fraction_reduced")),
        ]
        for b in report.get("bounds") or []
    ]
    header = ["Site", "Kind", "Channels", "Init max", "Final mean", "Final min", "Final max"]
    header.append("Fraction reduced")
    return ["## Activation bounds per layer", "", *_table(header, rows), ""]


def _timing_ordered(timing: Mapping[str, Any]) -> dict[str, Any]:
    """Timing with the total last, where a reader looks for a sum."""
    out = {k: v for k, v in timing.items() if k != "total"}
    if "total" in timing:
        out["total"] = timing["total"]
    return out


def _md_key_values(title: str, values: Mapping[str, Any], fmt: Callable[[Any], str]) -> list[str]:
    """A two-column table section for a flat mapping (config, timing)."""
    if not values:
        return [f"## {title}", "", "n/a", ""]
    rows = [[_cell(k), fmt(v)] for k, v in values.items()]
    return [f"## {title}", "", *_table(["Key", "Value"], rows), ""]


# --------------------------------------------------------------------------- figures


def _array(values: Any) -> np.ndarray:
    """A float array from a list that may hold None (sanitised NaN)."""
    return np.asarray(values if values else [], dtype=float)


def _no_data(ax: Axes, what: str) -> None:
    """Say so on an axis rather than draw an empty, misleading plot."""
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)


def _margins_figure(report: Mapping[str, Any]) -> Figure:
    """Grouped bars of each class's maximum margin on the original vs the bounded network.

    A backdoor target stands out as a class whose achievable margin is far above the others
    before bounding and collapses after it; the MM-BD target is shaded and labelled.
    """
    k = _num_classes(report)
    names = _class_names(report, k)
    mm = report.get("max_margins", {})
    before = np.full(k, np.nan)
    after = np.full(k, np.nan)
    b, a = _array(mm.get("before")), _array(mm.get("after"))
    before[: b.size], after[: a.size] = b[:k], a[:k]

    fig = Figure(figsize=(min(16.0, max(7.5, 0.45 * k + 2.0)), 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    ax.bar(x - 0.2, before, width=0.4, color=_BEFORE_COLOR, label="original network")
    ax.bar(x + 0.2, after, width=0.4, color=_AFTER_COLOR, label="bounded network")
    for xi, value in [(x - 0.2, before), (x + 0.2, after)]:
        for j in np.flatnonzero(~np.isfinite(value)):  # a missing bar would read as zero
            ax.text(xi[j], 0.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    mmbd = report.get("mmbd", {})
    target = mmbd.get("target")
    if isinstance(target, int) and 0 <= target < k:
        ax.axvspan(target - 0.5, target + 0.5, color=_ALERT_COLOR, alpha=0.12, lw=0)
        top = np.nanmax([before[target], after[target], 0.0])
        ax.annotate(
            "MM-BD target",
            (target, top),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            color=_ALERT_COLOR,
            fontsize=9,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90 if k > 10 else 0, fontsize=6 if k > 40 else 9)
    if isinstance(target, int) and 0 <= target < k:
        ax.get_xticklabels()[target].set_color(_ALERT_COLOR)
        ax.get_xticklabels()[target].set_fontweight("bold")
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylabel("maximum achievable margin")
    ax.margins(y=0.12)
    ax.legend(loc="best", fontsize=8)
    color = _ALERT_COLOR if mmbd.get("suspected") else "black"
    ax.set_title(f"MM-BD: {_verdict(report)}", color=color, fontsize=10, wrap=True)
    return fig


def _statistic_figure(report: Mapping[str, Any]) -> Figure:
    """Histogram of the statistic d on clean held-out images against the flagging threshold.

    Shows how much of the clean distribution sits beyond the threshold (the false-positive
    cost) and, for a Gaussian null, how well the fitted density matches the data.
    """
    null = report.get("null", {})
    d = _array(report.get("clean_statistics"))
    d = d[np.isfinite(d)]
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    if d.size:
        bins = int(np.clip(np.sqrt(d.size), 10, 60))
        ax.hist(
            d,
            bins=bins,
            density=True,
            color=_BEFORE_COLOR,
            alpha=0.6,
            label=f"clean held-out d (n = {d.size})",
        )
    else:
        _no_data(ax, "clean statistics")
    mu, sigma = _finite(null.get("mu")), _finite(null.get("sigma"))
    threshold = _finite(null.get("threshold"))
    if null.get("kind") == "gaussian" and mu is not None and sigma is not None and sigma > 0:
        ends = [mu - 4 * sigma, mu + 4 * sigma]
        ends += [float(d.min()), float(d.max())] if d.size else []
        ends += [threshold] if threshold is not None else []
        xs = np.linspace(min(ends), max(ends), 400)
        pdf = np.exp(-0.5 * ((xs - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        ax.plot(
            xs,
            pdf,
            color="black",
            lw=1.5,
            label=f"Gaussian null (mu = {_num(mu, 3)}, sigma = {_num(sigma, 3)})",
        )
    if threshold is not None:
        ax.axvline(
            threshold,
            color=_ALERT_COLOR,
            ls="--",
            lw=1.5,
            label=f"threshold = {_num(threshold, 4)} (alpha = {_num(null.get('alpha'))})",
        )
    ax.set_xlabel("detection statistic d")
    ax.set_ylabel("density")
    ax.set_title(f"Clean statistic vs {null.get('kind', 'unknown')} null")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return fig


def _bounds_scale(per_site: Sequence[np.ndarray]) -> tuple[bool, float]:
    """Whether to use a log y axis, and the floor that zeros are drawn at if so.

    Bounds often span orders of magnitude between early conv and late linear layers, and many
    may be driven to exactly zero; log scale keeps both visible, with zeros pinned to a floor.
    """
    values = np.concatenate([v for v in per_site if v.size] or [np.zeros(0)])
    positive = values[values > 0]
    if positive.size == 0 or positive.max() / positive.min() <= _LOG_SPAN:
        return False, 0.0
    return True, float(positive.min()) / 2.0


def _draw_site_values(ax: Axes, per_site: Sequence[np.ndarray]) -> None:
    """A box (quartiles, whiskers to the extremes) and a jittered strip of values per site.

    The box summarises layers with thousands of channels; the strip shows clusters (e.g. many
    channels clipped to the same value) that a box hides. Sites with no values get neither.
    """
    filled = [i for i, v in enumerate(per_site) if v.size]
    if not filled:
        return
    ax.boxplot(
        [per_site[i] for i in filled],
        positions=filled,
        widths=0.6,
        whis=(0.0, 100.0),
        showfliers=False,
        medianprops={"color": "black"},
    )
    rng = np.random.default_rng(0)  # fixed jitter: identical reports draw identical figures
    for i in filled:
        v = per_site[i]
        if v.size > _MAX_STRIP_POINTS:
            v = rng.choice(v, _MAX_STRIP_POINTS, replace=False)
        ax.scatter(
            i + rng.uniform(-0.22, 0.22, v.size),
            v,
            s=4,
            alpha=0.35,
            color=_BEFORE_COLOR,
            label="final bounds" if i == filled[0] else None,
        )


def _bounds_figure(report: Mapping[str, Any]) -> Figure:
    """Final bound values per ReLU site in network order: a box, the points, the initial max.

    Shows where the calibration actually clipped (boxes well under the init-max marker) and
    where it left the layer alone.
    """
    bounds = report.get("bounds") or []
    per_site = [_array(b.get("values")) for b in bounds]
    per_site = [v[np.isfinite(v)] for v in per_site]
    n = len(bounds)
    fig = Figure(figsize=(min(18.0, max(6.0, 0.5 * n + 2.5)), 5.0), layout="constrained")
    ax = fig.subplots()
    if n == 0:
        _no_data(ax, "bounded sites")
        return fig
    log, floor = _bounds_scale(per_site)
    if log:
        per_site = [np.maximum(v, floor) for v in per_site]
    _draw_site_values(ax, per_site)
    init = _array([b.get("init_max") for b in bounds])
    init = np.maximum(init, floor) if log else init
    ax.scatter(
        np.arange(n),
        init,
        marker="_",
        s=500,
        linewidths=2.0,
        color=_ALERT_COLOR,
        label="init max",
        zorder=3,
    )
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(
        [str(b.get("site")) for b in bounds],
        rotation=60 if n > 4 else 0,
        ha="right" if n > 4 else "center",
        fontsize=7 if n > 20 else 8,
    )
    ax.set_xlim(-0.6, n - 0.4)
    ylabel = "activation upper bound"
    if log:
        ax.set_yscale("log")
        ylabel += f" (log; zeros drawn at {_num(floor, 2)})"
    ax.set_ylabel(ylabel)
    ax.set_xlabel("bounded ReLU site (network order)")
    ax.set_title(f"Activation bounds per layer ({report.get('objective', '?')})")
    ax.legend(loc="best", fontsize=8)
    return fig


def _history_figure(report: Mapping[str, Any]) -> Figure:
    """Optimisation curves: whether the bound learning converged and where lambda went."""
    history = report.get("history") or []
    it = _array([h.get("iter") for h in history])

    def series(key: str) -> np.ndarray:
        return _array([h.get(key) for h in history])

    fig = Figure(figsize=(10.0, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    (a_loss, a_margin), (a_agree, a_lambda) = axes
    a_loss.plot(it, series("loss"), color="black", label="loss")
    a_loss.plot(it, series("fidelity"), color=_BEFORE_COLOR, ls="--", label="fidelity")
    a_loss.legend(loc="best", fontsize=8)
    a_loss.set_title("loss")
    a_margin.plot(it, series("margin"), color=_AFTER_COLOR)
    a_margin.set_title("margin term")
    a_agree.plot(it, series("agreement"), color=_BEFORE_COLOR)
    a_agree.set_title("agreement")
    lam = series("lambda")
    a_lambda.plot(it, lam, color=_ALERT_COLOR)
    positive = lam[np.isfinite(lam) & (lam > 0)]
    all_positive = positive.size > 0 and positive.size == np.isfinite(lam).sum()
    if all_positive and positive.max() / positive.min() > _LOG_SPAN:
        a_lambda.set_yscale("log")
    a_lambda.set_title("lambda")
    for ax in (a_agree, a_lambda):
        ax.set_xlabel("iteration")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Calibration history: {report.get('model_name', '')}")
    return fig
