"""The range detector (`mmguard calibrate --range-detector`): per bound site, how far the original
network's activations leave their clean range, read off the original network's own forward pass
(a second output of original.onnx), with its own null and the guard's Bonferroni combination,
from the pure statistic through calibration and the artifact to a real server answering
tritonclient."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guard.mmdf import (
    GPD_SHAPE_FLOOR,
    DecisionRule,
    Null,
    RangeDetector,
    StartDetector,
    decide,
    p_values,
    range_statistic,
    statistic,
)
from tests.conftest import TINY
from tests.helpers import first_per_class
from tests.serving import metadata_properties
from tests.test_cli import _calibrate_tiny
from tests.test_start_detector import (
    SMALL,
    _clean,
    _heldout,
    _infer,
    _poisoned,
)

ITERS = ("--max-iters", "4", "--min-iters", "2")

# --- the pure statistic and rule -----------------------------------------------------------


def test_range_statistic_is_the_largest_ratio_over_the_sites() -> None:
    ratios = np.array([[0.5, 0.75, 0.25], [2.5, 0.125, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(range_statistic(ratios), [0.75, 2.5, 0.0])
    assert range_statistic(ratios).dtype == np.float64
    for bad in (np.zeros(3), np.zeros((2, 0)), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError, match="activation ratios must have shape"):
            range_statistic(bad)


def _null(mu: float = 0.0, sigma: float = 1.0) -> Null:
    return Null(kind="gaussian", mu=mu, sigma=sigma)


def test_decide_flags_on_the_range_statistic_at_alpha_over_m() -> None:
    # three inputs, three classes; the original says class 0 with margin 4, the learned bounds
    # take nothing off (d = 0) and their best other class is 2
    g = np.array([[4.0, 0.0, 0.0]] * 3, dtype=np.float32)
    gz = np.array([[4.0, 0.0, 0.5]] * 3, dtype=np.float32)
    # range statistic under N(1, 0.1): input 0 at 30 sigma (flagged), input 1 at z = 2.7
    # (p = 0.0035: below alpha, not below alpha / 2), input 2 in range
    ratios = np.array([[0.8, 4.0], [1.27, 0.5], [0.9, 1.0]], dtype=np.float32)
    rule = DecisionRule(alpha=0.005)
    d = decide(g, gz, _null(), rule, None, RangeDetector(ratios, _null(1.0, 0.1)))
    assert d.flagged.tolist() == [True, False, False]
    p_range = p_values(_null(1.0, 0.1), range_statistic(ratios))
    expected = np.minimum(1, 2 * np.minimum(p_values(_null(), statistic(g, gz)), p_range))
    np.testing.assert_allclose(d.p_value, expected)
    assert d.label.tolist() == [2, 0, 0]  # corrected with the learned bounds
    np.testing.assert_array_equal(d.statistic, statistic(g, gz))  # the learned bounds' d
    # with a start detector too, each test is at alpha / 3: input 0 still flagged by range
    gs = np.array([[4.0, 0.0, 0.0], [1.2, 0.0, 0.0], [4.0, 0.0, 0.0]], dtype=np.float32)
    three = decide(
        g, gz, _null(), rule, StartDetector(gs, _null()), RangeDetector(ratios, _null(1.0, 0.1))
    )
    p_start = p_values(_null(), statistic(g, gs))  # input 1: d = 2.8, p = 0.00256 > 0.005 / 3
    np.testing.assert_allclose(
        three.p_value,
        np.minimum(1, 3 * np.minimum(np.minimum(p_values(_null(), statistic(g, gz)), p_start),
                                     p_range)),
    )  # fmt: skip
    assert three.flagged.tolist() == [True, False, False]


# --- the network ---------------------------------------------------------------------------


def test_site_ratio_known_values() -> None:
    from calibrate.rangeprobe import SiteRatio

    # 2 inputs, 3 channels, 2x2 positions; clean maxima 2, 4 and 0 (channel 2 never active)
    a = torch.zeros(2, 3, 2, 2)
    a[0, 0, 1, 1], a[0, 1, 0, 0], a[0, 2, 0, 1] = 1.0, 6.0, 9.0  # 0.5, 1.5, ignored
    a[1, 0, 0, 0], a[1, 1, 1, 0] = 3.0, 2.0  # 1.5, 0.5
    site = SiteRatio(torch.tensor([2.0, 4.0, 0.0]))
    np.testing.assert_allclose(site(a).numpy(), [[1.5], [1.5]])
    # a linear site: one value per neuron
    lin = SiteRatio(torch.tensor([1.0, 10.0]))
    np.testing.assert_allclose(lin(torch.tensor([[0.5, 20.0], [3.0, 1.0]])).numpy(), [[2.0], [3.0]])


def test_a_nearly_dead_channel_is_measured_against_the_sites_floor() -> None:
    from calibrate.rangeprobe import RANGE_FLOOR, SiteRatio, ratio_denominators

    # clean maxima 0.001, 4, 2, 6 and 0: median of the active ones 3, floor 0.05 * 3 = 0.15
    u = torch.tensor([0.001, 4.0, 2.0, 6.0, 0.0])
    assert RANGE_FLOOR == 0.05
    np.testing.assert_allclose(ratio_denominators(u).numpy(), [0.15, 4.0, 2.0, 6.0, 0.0])
    # 0.3 in the nearly dead channel is 2 floors (300 of its own maximum); 9 in the dead one
    # still counts 0; 2 in channel 1 is 0.5
    a = torch.tensor([[0.3, 2.0, 0.0, 0.0, 9.0], [0.0, 2.0, 0.0, 0.0, 9.0]])
    np.testing.assert_allclose(SiteRatio(u)(a).numpy(), [[2.0], [0.5]], rtol=1e-6)
    assert not ratio_denominators(torch.zeros(3)).any()  # a site never active stays at 0


def test_leave_one_out_ratios_known_values() -> None:
    from calibrate.errors import CalibrationError
    from calibrate.rangeprobe import leave_one_out_ratios

    # per-image channel maxima of 3 images at two sites
    site0 = torch.tensor([[2.0, 1.0], [4.0, 3.0], [1.0, 3.0]])  # channel 1: a tie at 3
    site1 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 5.0]])  # channel 1: image 2 alone
    loo = leave_one_out_ratios([site0, site1])
    # image 0 against maxima (4, 3) and (2, 5): 0.5 and 0.5
    # image 1 against (2, 3) and (1, 5): 2 and 2
    # image 2 against (4, 3) (the other 3 of the tie) and (2, 0): 1, and 0.5 (channel 1 was
    # never active on the others, so it counts 0, as SiteRatio counts a dead channel)
    np.testing.assert_allclose(loo, [[0.5, 0.5], [2.0, 2.0], [1.0, 0.5]])
    assert loo.dtype == np.float32
    # maxima over images 0 and 1 only: image 2 is measured against both, as a new image is
    # (1 and 0.5); image 0 against image 1 alone (0.5, 0.5), image 1 against image 0 (3, 2)
    inside = np.array([True, True, False])
    np.testing.assert_allclose(
        leave_one_out_ratios([site0, site1], inside), [[0.5, 0.5], [3.0, 2.0], [1.0, 0.5]]
    )
    with pytest.raises(CalibrationError, match="at least 2 clean images"):
        leave_one_out_ratios([site0[:1]])
    with pytest.raises(CalibrationError, match="classifies correctly, got 1"):
        leave_one_out_ratios([site0, site1], np.array([False, True, False]))
    with pytest.raises(CalibrationError, match="2 inside flags for 3 images"):
        leave_one_out_ratios([site0, site1], np.array([True, True]))


def test_the_clean_scale_is_the_kth_largest_per_image_maximum() -> None:
    from calibrate.rangeprobe import clean_scales, scale_rank

    assert [scale_rank(n) for n in (1, 2, 99, 100, 101, 430, 700)] == [1, 1, 1, 1, 2, 5, 7]
    # 250 images, k = 3: channel 0 counts 0..249 -> 247; channel 1 active on two images only
    # (fewer than k) -> their largest, 7; channel 2 never active -> 0
    a = torch.zeros(250, 3)
    a[:, 0] = torch.arange(250.0)
    a[10, 1], a[20, 1] = 7.0, 3.0
    (u,) = clean_scales([a])
    np.testing.assert_array_equal(u.numpy(), [247.0, 7.0, 0.0])
    # over some images only: the 150 odd ones, k = 2 -> 247 and 245; channel 1 off them -> 0
    inside = np.arange(250) % 2 == 1
    (u,) = clean_scales([a], inside)
    np.testing.assert_array_equal(u.numpy(), [247.0, 0.0, 0.0])


@pytest.mark.parametrize("n", [12, 230])  # k = 1 (the maximum) and k = 3
def test_leave_one_out_ratios_are_the_served_ratios_against_the_others(n: int) -> None:
    """Each image's leave-one-out ratios equal what the served network (`SiteRatio`, floor
    included) computes for it with the other images' clean scales."""
    from calibrate.rangeprobe import SiteRatio, clean_scales, leave_one_out_ratios

    g = torch.Generator().manual_seed(3)
    sites = [torch.rand(n, 6, generator=g) * 4, torch.rand(n, 9, generator=g)]
    sites[0][:, 2] = 0.0  # never active
    sites[0][:, 4] *= 1e-3  # nearly dead: under the floor
    sites[1][:, 7] *= (torch.arange(n) < 2).float()  # active on two images only
    sites[1][3, 8] = 50.0  # one image far out of every other's range
    loo = leave_one_out_ratios(sites)
    for inside in (np.ones(n, dtype=bool), np.arange(n) % 3 != 0):
        got = leave_one_out_ratios(sites, inside)
        for i in range(n):
            others = inside & (np.arange(n) != i)
            scales = clean_scales(sites, others)
            want = [SiteRatio(u)(a[i : i + 1]).item() for u, a in zip(scales, sites, strict=True)]
            np.testing.assert_allclose(got[i], want, rtol=1e-6)
        if inside.all():
            np.testing.assert_array_equal(got, loo)
    assert loo[3, 1] > 10.0 and loo[:, 1].max() == loo[3, 1]


def test_class_denominators_known_values() -> None:
    from calibrate.rangeprobe import CLASS_FLOOR, class_denominators

    assert CLASS_FLOOR == 0.5
    # scales over all classes 0.001 (floored to 0.15, below), 4, 2, 6, 0 (never active);
    # one class's own 1, 3, 0.5, 0 and 7: max(own, 0.5 x the floored global), 0 stays 0
    u = torch.tensor([0.001, 4.0, 2.0, 6.0, 0.0])
    own = torch.tensor([1.0, 3.0, 0.5, 0.0, 7.0])
    np.testing.assert_allclose(
        class_denominators(u, own).numpy(), [1.0, 3.0, 1.0, 3.0, 0.0], rtol=1e-6
    )


def test_class_conditional_ratios_known_values() -> None:
    """An image is measured against its predicted class's scales (floored at half those over
    all classes); a class with fewer than MIN_CLASS_IMAGES inside keeps the scales over all."""
    from calibrate.rangeprobe import MIN_CLASS_IMAGES, SiteRatio, inverse_tables

    assert MIN_CLASS_IMAGES == 2
    # 5 images, one site, 2 channels; classes 0, 0, 1, 1, 2 (class 2 has one image)
    a = torch.tensor([[4.0, 1.0], [2.0, 2.0], [1.0, 8.0], [1.0, 6.0], [3.0, 3.0]])
    classes = np.array([0, 0, 1, 1, 2])
    inside = np.ones(5, dtype=bool)
    (table,) = inverse_tables([a], inside, classes, 3)
    # over all 5 (k = 1): maxima 4 and 8, site median 6, floor 0.3: denominators 4, 8
    # class 0: own maxima 4, 2 -> max(4, 2), max(2, 4) = 4, 4
    # class 1: own 1, 8 -> max(1, 2) = 2, max(8, 4) = 8
    # class 2: one image, the scales over all: 4, 8
    np.testing.assert_allclose(1 / table.numpy(), [[4, 4], [2, 8], [4, 8]], rtol=1e-6)
    # a new image [3, 4] predicted 0, 1 and 2: 0.75 v 1 -> 1; 1.5 v 0.5 -> 1.5; 0.75 v 0.5
    new = torch.tensor([[3.0, 4.0]] * 3)
    got = SiteRatio(inverse=table)(new, torch.tensor([0, 1, 2]))
    np.testing.assert_allclose(got.numpy(), [[1.0], [1.5], [0.75]], rtol=1e-6)
    with pytest.raises(ValueError, match="need the predicted class"):
        SiteRatio(inverse=table)(new)


def test_all_sites_together_equal_each_site_alone() -> None:
    """SiteRatios (the exported network's one module for every site) gives, column for column,
    what SiteRatio gives site by site: sites of different widths and kinds (activations and
    channel maxima), a group of scales over all classes and one looked up by class."""
    from calibrate.rangeprobe import SiteRatio, SiteRatios

    gen = torch.Generator().manual_seed(0)
    widths, classes, n = (3, 5, 2), 4, 6
    acts = [torch.randn(n, 3, 4, 4, generator=gen), torch.randn(n, 5, generator=gen),
            torch.rand(n, 2, 3, 3, generator=gen) + 1]  # fmt: skip
    scales = [torch.rand(w, generator=gen) + 0.5 for w in widths]
    scales[0][1] = 0.0  # a channel never active on the clean images
    by_class = [torch.rand(classes, w, generator=gen) for w in widths]
    cls = torch.tensor([0, 3, 1, 1, 2, 0])
    got = SiteRatios([scales, by_class])(*acts, cls=cls)
    want = torch.cat(
        [SiteRatio(u)(a) for u, a in zip(scales, acts, strict=True)]
        + [SiteRatio(inverse=t)(a, cls) for t, a in zip(by_class, acts, strict=True)],
        dim=1,
    )
    assert got.shape == (n, 2 * len(widths))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="widths"):
        SiteRatios([scales, [*by_class[:2], torch.rand(classes, 7)]])
    with pytest.raises(ValueError, match="need the predicted class"):
        SiteRatios([scales, by_class])(*acts)


def test_balance_puts_the_clean_tails_level() -> None:
    from calibrate.rangeprobe import BALANCE_QUANTILE, balance

    assert BALANCE_QUANTILE == 0.95
    over_all = np.arange(101.0)  # 95th percentile 95
    np.testing.assert_allclose(balance(over_all, 2 * over_all), 0.5)
    np.testing.assert_allclose(balance(over_all, over_all / 4), 4.0)
    assert balance(np.zeros(5), over_all) == 1.0 and balance(over_all, np.zeros(5)) == 1.0


@pytest.mark.parametrize("n", [40, 400])  # k = 1 per class and overall; k = 4 overall
def test_class_conditional_leave_one_out_is_the_served_ratio_against_the_others(n: int) -> None:
    """Each clean image's leave-one-out ratio with class scales equals what the served
    network computes for it from the tables (`inverse_tables`) of the other images, its own
    class's included; a misclassified image (outside) is measured as a new image of the class
    it is predicted."""
    from calibrate.rangeprobe import SiteRatio, inverse_tables, leave_one_out_ratios

    g = torch.Generator().manual_seed(5)
    sites = [torch.rand(n, 5, generator=g) * 3, torch.rand(n, 7, generator=g)]
    sites[0][:, 1] = 0.0  # never active
    sites[1][:, 3] *= 1e-3  # nearly dead: under the floor
    classes = np.arange(n) % 3
    classes[:2] = 3  # class 3: two images only, one of them outside
    sites[1][5, 6] = 30.0  # one image far out of every other's range
    inside = np.arange(n) % 7 != 0
    got = leave_one_out_ratios(sites, inside, classes)
    for i in range(n):
        others = inside & (np.arange(n) != i)
        tables = inverse_tables(sites, others, classes, 4)
        cls = torch.tensor([int(classes[i])])
        want = [
            SiteRatio(inverse=t)(a[i : i + 1], cls).item()
            for t, a in zip(tables, sites, strict=True)
        ]
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    # a class's scale is never under CLASS_FLOOR times that over all classes, so no ratio is
    # over 1 / CLASS_FLOOR times the one over all classes; the class scales do move them
    plain = leave_one_out_ratios(sites, inside)
    assert (got <= 2 * plain + 1e-6).all()
    assert (got > plain + 1e-3).any()


def _tiny_network() -> tuple[torch.nn.Module, torch.Tensor]:
    from calibrate.modelsrc import ModelSource, load_model

    model = load_model(
        ModelSource(factory="calibrate.synthetic:small_cnn", weights=TINY / "model.pt"), 4
    )
    x, _ = _clean()
    return model.eval(), torch.from_numpy(x)


def test_the_range_network_is_the_original_with_its_ratios() -> None:
    from calibrate.bounded import BoundedNetwork
    from calibrate.rangeprobe import RangeNetwork, per_image_maxima

    model, x = _tiny_network()
    net = BoundedNetwork(model, x[:2])
    net.init_bounds("max", x[:60])
    before = [b.detach().clone() for b in net.bounds()]
    with torch.no_grad():  # lower one bound so the bounded network differs from the original
        net.bounds()[0].mul_(0.5)
    lowered = [b.detach().clone() for b in net.bounds()]
    per_image, logits = per_image_maxima(net, x[:60], batch_size=16)
    maxima = [a.amax(dim=0) for a in per_image]
    for b, want in zip(net.bounds(), lowered, strict=True):  # restored after recording
        torch.testing.assert_close(b.detach(), want)
    with torch.no_grad():  # the same passes' logits are the original network's
        torch.testing.assert_close(logits, model(x[:60]))
    # the original network's maxima, not the bounded one's: equal to the "max" start bounds
    for u, b0 in zip(maxima, before, strict=True):
        torch.testing.assert_close(u, b0)
    ranged = RangeNetwork(net, maxima)
    with torch.no_grad():
        logits, ratios = ranged(x)
        torch.testing.assert_close(logits, model(x))
    assert ratios.shape == (len(x), len(net.sites))
    learn = ranged.ratios(x[:60], batch_size=16).numpy()
    assert learn.max() <= 1.0 + 1e-6  # no learning image leaves its own range
    assert np.allclose(learn.max(axis=0), 1.0, atol=1e-6)  # and some image sets each maximum
    poisoned = ranged.ratios(torch.from_numpy(_poisoned()), batch_size=16).numpy()
    assert range_statistic(poisoned).min() > range_statistic(learn).max()


# --- calibration and serving ---------------------------------------------------------------


@pytest.fixture(scope="module")
def range_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A default calibration: its 108 held-out images carry the range detector's gpd null, so
    it is on without being asked for (test_range_and_start_detectors_together asks)."""
    out = tmp_path_factory.mktemp("range") / "art"
    manifest, report = _calibrate_tiny(out, *SMALL, *ITERS)
    assert report["config"]["range_detector"] is True and "range_detector_off" not in report
    # and the learned statistic's default gpd null, its tail shape held at 0 or above
    assert report["config"]["null"] == manifest["null"]["kind"] == "gpd"
    assert "chosen" not in report["null"] and manifest["null"]["tail_xi"] >= GPD_SHAPE_FLOOR
    return out, manifest, report


@pytest.mark.slow
def test_the_artifact_carries_the_ratios_output_and_its_null(
    range_artifact: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    import onnxruntime as ort

    from guard.artifact import RANGE_SCHEMA_VERSION, load_artifact

    out, manifest, report = range_artifact
    assert manifest["schema_version"] == RANGE_SCHEMA_VERSION
    assert set(manifest["files"]) == {"original", "bounded"}  # no third network
    ranged = manifest["range_detector"]
    assert ranged["output"] == "activation_ratio" and ranged["sites"] == len(report["bounds"])
    # the null is fitted on every clean image, each against the others' maxima
    n_clean = 108 + report["split"]["learn"]
    assert ranged["null"]["kind"] == "gpd" and ranged["null"]["n"] == n_clean
    assert ranged["null"]["tail_xi"] >= GPD_SHAPE_FLOOR  # no finite end to its tail
    assert report["null"]["level"] == 0.0025  # each of the two statistics at alpha / 2
    assert report["range_detector"]["null"]["level"] == 0.0025
    assert len(report["range_detector"]["clean_statistics"]) == n_clean
    assert report["range_detector"]["learning_images"] == report["split"]["learn"]
    assert len(report["range_detector"]["sites"]) == ranged["sites"]
    sess = ort.InferenceSession(str(out / "original.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "activation_ratio"]
    # every site's ratios in a few nodes, not a few per site (each node is a kernel launch on
    # a GPU): one ReduceMax per convolutional site for its channel maxima (a linear site's
    # values are its maxima), then one of each for all sites
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(out / "original.onnx")).graph.node)
    sites = ranged["sites"]
    assert ops["ReduceMax"] <= sites + 1 and ops["Concat"] == 1 and ops["Mul"] == 1
    assert ops["Gather"] == 2 and ops["ArgMax"] == 1  # the class's rows, each site's channels
    art = load_artifact(out)
    assert art.range_output == "activation_ratio" and art.range_null is not None
    text = (out / "report.md").read_text()
    assert "## Range detector" in text
    assert "clean scale, the 2nd largest of its per-image maxima" in text
    assert "measured twice, against the scales over all classes and against the scales" in text
    assert "4 classes have scales of their own" in text
    # the learned bounds are a plain calibration's: the range detector only adds a test
    plain, _ = _calibrate_tiny(tmp_path / "plain", "--no-range-detector", *SMALL, *ITERS)
    assert manifest["files"]["bounded"]["sha256"] == plain["files"]["bounded"]["sha256"]
    assert manifest["files"]["original"]["sha256"] != plain["files"]["original"]["sha256"]


@pytest.mark.slow
def test_the_guard_combines_the_range_p_value(range_artifact: tuple[Path, dict, dict]) -> None:
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    art = load_artifact(range_artifact[0])
    engine = GuardEngine(art, "cpu", threads=1)
    x = np.concatenate([_poisoned(), _clean()[0]])
    out = engine.logits(x)
    assert out.start is None and out.ratios is not None and art.range_null is not None
    assert out.ratios.shape == (len(x), range_artifact[1]["range_detector"]["ratio_columns"])
    assert range_artifact[1]["range_detector"]["ratio_columns"] == 2 * len(
        range_artifact[2]["bounds"]
    )
    p_learned = p_values(art.null, statistic(out.original, out.bounded))
    p_range = p_values(art.range_null, range_statistic(out.ratios))
    d = engine.decide(x)
    np.testing.assert_allclose(d.p_value, np.minimum(1, 2 * np.minimum(p_learned, p_range)))
    flagged = (p_learned < art.rule.alpha / 2) | (p_range < art.rule.alpha / 2)
    assert d.flagged.tolist() == flagged.tolist()
    assert d.flagged[: len(_poisoned())].all() and not d.flagged[len(_poisoned()) :].any()
    np.testing.assert_array_equal(engine.original_logits(x), out.original)
    # `--range-scales both`, the default: per site, first the ratio against the k-th largest
    # per-image maxima over the correctly classified learning and held-out images, then the
    # one against those of the class the network predicts (at least CLASS_FLOOR x the first),
    # times the balance that puts the two clean statistics' 95th percentiles level
    from calibrate.rangeprobe import (
        SiteRatio,
        balance,
        clean_scales,
        inverse_tables,
        leave_one_out_ratios,
        scale_rank,
    )

    per_image, inside, predicted, served = _clean_maxima(engine)
    report = range_artifact[2]["range_detector"]
    assert report["maxima_images"] == inside.sum() and report["scale_rank"] == 2  # ~110 images
    assert scale_rank(int(inside.sum())) == 2
    assert report["scales"] == "both" and report["classes_with_own_scales"] == [0, 1, 2, 3]
    sites = len(per_image)
    assert served.shape == (len(inside), 2 * sites) and report["ratio_columns"] == 2 * sites
    weight = balance(
        range_statistic(leave_one_out_ratios(per_image, inside)),
        range_statistic(leave_one_out_ratios(per_image, inside, predicted)),
    )
    assert report["balance"] == pytest.approx(weight) and weight > 0
    scales = clean_scales(per_image, inside)
    tables = inverse_tables(per_image, inside, predicted, 4)
    assert all(t.shape[0] == 4 for t in tables)
    cls = torch.from_numpy(predicted)
    want = np.concatenate(
        [SiteRatio(u)(a).numpy() for u, a in zip(scales, per_image, strict=True)]
        + [
            weight * SiteRatio(inverse=t)(a, cls).numpy()
            for t, a in zip(tables, per_image, strict=True)
        ],
        axis=1,
    )
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-5)
    # the null saw each clean image's statistic the same way, against the others' scales
    loo = np.concatenate(
        [
            leave_one_out_ratios(per_image, inside),
            np.float32(weight) * leave_one_out_ratios(per_image, inside, predicted),
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        report["clean_statistics"], range_statistic(loo), rtol=1e-5, atol=1e-6
    )


def _clean_maxima(engine: Any) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, np.ndarray]:
    """The tiny calibration's clean images (learning, then held-out): per site their channel
    maxima in the original network, which of them it classifies correctly, its predicted
    classes, and the ratios the engine serves for them."""
    from calibrate.bounded import BoundedNetwork
    from calibrate.config import CalibrationConfig
    from calibrate.dataset import load_clean_set, split_clean_set
    from calibrate.rangeprobe import per_image_maxima

    learn, held = split_clean_set(load_clean_set(TINY / "clean.npz"), 0.9, CalibrationConfig().seed)
    assert len(held.labels) == 108
    images = np.concatenate([learn.images, held.images])
    served = engine.logits(images)
    predicted = served.original.argmax(1)
    inside = predicted == np.concatenate([learn.labels, held.labels])
    model, _ = _tiny_network()
    per_image, _ = per_image_maxima(
        BoundedNetwork(model, torch.from_numpy(images[:2])), torch.from_numpy(images), 64
    )
    assert served.ratios is not None
    return per_image, inside, predicted, served.ratios


@pytest.mark.slow
def test_a_real_server_serves_the_range_detector(range_artifact: tuple[Path, dict, dict]) -> None:

    from guard.artifact import load_artifact
    from guard.engine import GuardEngine
    from tests.serving import running, serve_config

    out = range_artifact[0]
    x = np.concatenate([_poisoned()[:4], _clean()[0][:4]])
    expected = GuardEngine(load_artifact(out), "cpu", threads=1).decide(x)
    assert expected.flagged.any() and not expected.flagged.all()
    with running(serve_config(out)) as srv:
        properties = metadata_properties(srv.url, "art")
        assert properties["range_detector"] == "gpd"
        assert properties["start_detector"] == "none"
        res = _infer(srv.url, x)
    assert res.as_numpy("flagged").tolist() == expected.flagged.tolist()
    assert res.as_numpy("label").tolist() == expected.label.tolist()
    np.testing.assert_allclose(res.as_numpy("p_value"), expected.p_value, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
def test_the_unguarded_baseline_runs_the_original_without_its_ratios(
    range_artifact: tuple[Path, dict, dict],
) -> None:
    from guard.artifact import load_artifact
    from guard.engine import EngineError, GuardEngine
    from tests.serving import running, serve_config

    art = load_artifact(range_artifact[0])
    x = np.concatenate([_poisoned()[:4], _clean()[0][:4]])
    full = GuardEngine(art, "cpu", threads=1)
    plain = GuardEngine(art, "cpu", threads=1, original_only=True)
    (session,) = plain._sessions  # one network, one output: the ratios' nodes are gone
    assert [o.name for o in session.get_outputs()] == ["logits"]
    np.testing.assert_allclose(plain.original_logits(x), full.logits(x).original, rtol=1e-5)
    with pytest.raises(EngineError, match="original network alone"):
        plain.logits(x)
    with running(serve_config(range_artifact[0], mode="unguarded")) as srv:
        res = _infer(srv.url, x)
    assert res.as_numpy("label").tolist() == full.logits(x).original.argmax(1).tolist()
    assert not res.as_numpy("flagged").any()


@pytest.mark.slow
def test_range_and_start_detectors_together(tmp_path: Path) -> None:
    from guard.artifact import RANGE_SCHEMA_VERSION, load_artifact
    from guard.engine import GuardEngine

    out = tmp_path / "art"
    manifest, report = _calibrate_tiny(
        out, "--range-detector", "--range-scales", "global", "--start-detector", *SMALL, *ITERS
    )
    assert manifest["schema_version"] == RANGE_SCHEMA_VERSION
    assert set(manifest["files"]) == {"original", "bounded", "start"}
    assert report["null"]["level"] == pytest.approx(0.005 / 3)
    art = load_artifact(out)
    assert art.start_null is not None and art.range_null is not None
    engine = GuardEngine(art, "cpu", threads=1)
    x = np.concatenate([_poisoned(), _clean()[0]])
    o = engine.logits(x)
    assert o.start is not None and o.ratios is not None
    ps = [
        p_values(art.null, statistic(o.original, o.bounded)),
        p_values(art.start_null, statistic(o.original, o.start)),
        p_values(art.range_null, range_statistic(o.ratios)),
    ]
    np.testing.assert_allclose(engine.decide(x).p_value, np.minimum(1, 3 * np.min(ps, axis=0)))
    # --range-scales global: every input against the scales over all classes (before stop 25)
    from calibrate.rangeprobe import SiteRatio, clean_scales

    assert report["range_detector"]["scales"] == "global"
    assert report["config"]["range_scales"] == "global"
    assert "per predicted class" not in manifest["range_detector"]["statistic"]
    per_image, inside, _, served = _clean_maxima(engine)
    want = np.concatenate(
        [
            SiteRatio(u)(a).numpy()
            for u, a in zip(clean_scales(per_image, inside), per_image, strict=True)
        ],
        axis=1,
    )
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-5)


# --- the artifact's checks (its null-size refusal: tests/test_start_detector.py) ------------


@pytest.fixture()
def range_copy(range_artifact: tuple[Path, dict, dict], tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "copy"
    shutil.copytree(range_artifact[0], copy)
    yield copy


@pytest.mark.slow
def test_schema_3_without_its_range_parts_is_refused(range_copy: Path) -> None:
    from guard.artifact import ArtifactError, load_artifact

    path = range_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["range_detector"]["output"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"range_detector\.output"):
        load_artifact(range_copy)
    manifest.pop("range_detector")
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"range_detector"):
        load_artifact(range_copy)


def test_the_reports_false_positive_rate_counts_the_range_flags() -> None:
    """heldout_figures with the range detector's ratios counts its flags too (cross-fitted)."""
    from calibrate.config import CalibrationConfig
    from calibrate.evaluation import cross_fitted_decisions, heldout_figures

    rng = np.random.default_rng(0)
    g, gz, y = _heldout(rng)
    n = len(y)
    ratios = rng.normal(0.9, 0.05, (n, 4)).astype(np.float32)
    ratios[:8, 2] = 5.0  # eight images far outside the clean range at one site
    cfg = CalibrationConfig(null="gaussian", range_null="gaussian", range_detector=True)
    _, flagged = cross_fitted_decisions(g, gz, cfg, False, None, ratios)
    _, flagged_alone = cross_fitted_decisions(g, gz, cfg, False)
    assert flagged[:8].all() and not flagged_alone[:8].any()
    both = heldout_figures(g, gz, y, cfg, None, ratios)
    assert both["false_positive_rate"] == flagged.mean() >= 8 / n
    # every fold's range null is also fitted on the learning images' statistics: with many of
    # those as far out as the eight, they are ordinary, and no longer flagged
    extra = np.full(400, 5.0)
    _, flagged_extra = cross_fitted_decisions(g, gz, cfg, False, None, ratios, extra)
    assert not flagged_extra[:8].any()
    fig = heldout_figures(g, gz, y, cfg, None, ratios, extra)
    assert fig["false_positive_rate"] == flagged_extra.mean() < 8 / n


# --- on by default where the clean set carries its null -------------------------------------


def test_by_default_the_range_detector_is_on_when_the_clean_set_carries_its_null() -> None:
    from calibrate.config import CalibrationConfig
    from calibrate.errors import CalibrationError

    cfg = CalibrationConfig()
    assert cfg.range_detector is None
    with pytest.raises(CalibrationError, match="undecided"):
        _ = cfg.test_level
    # a gpd tail on each half of the held-out set: 2 x 50 images
    assert cfg.resolve(100).range_detector is True and cfg.resolve(100).test_level == 0.0025
    assert cfg.resolve(99).range_detector is False and cfg.resolve(99).test_level == 0.005
    # the learning images' leave-one-out statistics join each half: 50 in each fit
    assert cfg.resolve(50, 25).range_detector is True
    assert cfg.resolve(49, 26).range_detector is True  # 24 + 26
    assert cfg.resolve(48, 25).range_detector is False  # 24 + 25
    assert cfg.resolve(1, 10_000).range_detector is False  # no held-out images to cross-fit
    # said, it is kept (and too small a set is then refused with what it needs)
    assert CalibrationConfig(range_detector=False).resolve(10_000).range_detector is False
    assert CalibrationConfig(range_detector=True).resolve(10).range_detector is True
    # an empirical null's smallest p-value 1/(n+1) must get below alpha / 2
    emp = CalibrationConfig(range_null="empirical")
    assert emp.resolve(400).range_detector is True and emp.resolve(399).range_detector is False
    assert emp.resolve(200, 200).range_detector is True
    assert emp.resolve(200, 199).range_detector is False
    assert CalibrationConfig(range_null="gaussian").resolve(2).range_detector is True


def test_by_default_the_null_is_gpd_when_the_heldout_images_carry_it() -> None:
    from calibrate.config import CalibrationConfig
    from calibrate.errors import CalibrationError

    cfg = CalibrationConfig()
    assert cfg.null is None
    with pytest.raises(CalibrationError, match="null is undecided"):
        _ = cfg.null_kind
    # a gpd tail on each half of the held-out set (the report's false-positive rate): 2 x 50
    assert cfg.resolve(100).null_kind == "gpd" and cfg.resolve(5000, 10).null_kind == "gpd"
    assert cfg.resolve(99).null_kind == "yeojohnson"
    # the learning images never join the learned statistic's null (the bounds were fitted on
    # them), so they do not count
    assert cfg.resolve(99, 10_000).null_kind == "yeojohnson"
    # said, it is kept, and too small a set is then refused (test_cli)
    assert CalibrationConfig(null="yeojohnson").resolve(10_000).null_kind == "yeojohnson"
    assert CalibrationConfig(null="gpd").resolve(10).null_kind == "gpd"
    # both decided in one resolve, the range detector's first
    both = CalibrationConfig().resolve(100, 400)
    assert (both.null, both.range_detector, both.test_level) == ("gpd", True, 0.0025)


def test_a_default_calibration_says_why_its_range_detector_is_off(tmp_path: Path) -> None:
    """10 clean images per class (4 classes): 16 held-out and 24 learning images, too
    few for the range detector's gpd null; the default then calibrates without it."""
    from guard.artifact import MANIFEST_SCHEMA_VERSION

    small = first_per_class(TINY / "clean.npz", 10, tmp_path / "small.npz")
    out = tmp_path / "art"
    manifest, report = _calibrate_tiny(out, "--data", str(small), "--mmbd-steps", "10", *ITERS)
    assert report["config"]["range_detector"] is False
    assert (
        "range_detector" not in manifest and manifest["schema_version"] == MANIFEST_SCHEMA_VERSION
    )
    assert report["split"]["learn"] == 24
    off = "off: the 24 learning and 16 held-out images are too few for its gpd null"
    assert report["range_detector_off"].startswith(off)
    text = (out / "report.md").read_text()
    assert "## Range detector\n\nOff: the 24 learning and 16 held-out" in text
    # nor do the 16 held-out images carry the learned statistic's default gpd null
    chosen = "yeojohnson: the 16 held-out images are too few for a gpd null, the default where"
    assert report["null"]["kind"] == "yeojohnson" and report["null"]["chosen"].startswith(chosen)
    assert f"## Detection null\n\nThe null is {chosen}" in text


def test_range_scales_is_checked() -> None:
    from calibrate.config import CalibrationConfig
    from calibrate.errors import CalibrationError

    assert CalibrationConfig().range_scales == "both"
    with pytest.raises(CalibrationError, match="invalid value for range_scales: 'per-class'"):
        CalibrationConfig(range_scales="per-class")
