"""The start detector (`mmguard calibrate --start-detector`): a third network under the bounds
MMAC's first iteration left, its own null, and the guard's Bonferroni combination of the two
p-values, from calibration through the artifact to a real server answering tritonclient, on the
CPU and (where onnxruntime has CUDA) on a GPU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.mmdf import (
    DecisionRule,
    Null,
    StartDetector,
    best_other_class,
    bonferroni,
    decide,
    p_values,
    statistic,
)
from tests.conftest import TINY
from tests.helpers import first_per_class, run_cli
from tests.test_cli import _assert_one_line_error, _calibrate_tiny, _nothing_written, _tiny_args
from tests.test_server_cuda import requires_gpu

# 108 held-out images (a gpd null needs 100); few MM-BD steps: the bounds' values do not matter
SMALL = ("--heldout-fraction", "0.9", "--mmbd-steps", "10")
# 108 held-out images: enough for the range detector's null, which would be on by default; these
# tests are of the start detector alone
NO_RANGE = "--no-range-detector"


def _poisoned() -> np.ndarray:
    images = np.load(TINY / "poisoned.npz")["images"]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255


def _clean() -> tuple[np.ndarray, np.ndarray]:
    npz = np.load(TINY / "clean.npz")
    images = np.ascontiguousarray(npz["images"].transpose(0, 3, 1, 2)).astype(np.float32) / 255
    return images, npz["labels"]


# --- the pure rule -------------------------------------------------------------------------


def test_bonferroni_known_values() -> None:
    got = bonferroni(np.array([0.001, 0.3, 0.6, 0.0]), np.array([0.5, 0.002, 0.9, 1.0]))
    np.testing.assert_allclose(got, [0.002, 0.004, 1.0, 0.0])
    # three tests: three times the smallest
    np.testing.assert_allclose(
        bonferroni(np.array([0.01]), np.array([0.2]), np.array([0.3])), [0.03]
    )


def _null(mu: float = 0.0, sigma: float = 1.0) -> Null:
    return Null(kind="gaussian", mu=mu, sigma=sigma)


def test_decide_flags_on_either_statistic_at_half_alpha_and_corrects_with_learned() -> None:
    # three inputs, three classes; original logits all say class 0 with margin 4
    g = np.array([[4.0, 0.0, 0.0]] * 3, dtype=np.float32)
    # learned bounds: input 0 loses margin 3 (z = 3, p = 0.00135 < 0.0025), others nothing;
    # their best other class is 2
    gz = np.array([[1.0, 0.0, 0.5], [4.0, 0.0, 0.5], [4.0, 0.0, 0.5]], dtype=np.float32)
    # start bounds: input 1 loses margin 3 (flagged by the start statistic); input 2 loses
    # 2.7 (p = 0.0035: below alpha but not below alpha / 2, so not flagged)
    gs = np.array([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.3, 0.0, 0.0]], dtype=np.float32)
    rule = DecisionRule(alpha=0.005)
    d = decide(g, gz, _null(), rule, StartDetector(gs, _null()))
    assert d.flagged.tolist() == [True, True, False]
    expected_p = np.minimum(1, 2 * np.minimum(p_values(_null(), statistic(g, gz)),
                                              p_values(_null(), statistic(g, gs))))  # fmt: skip
    np.testing.assert_allclose(d.p_value, expected_p)
    assert d.label.tolist() == [2, 2, 0]  # the learned bounds' best other class, not the start's
    np.testing.assert_array_equal(d.statistic, statistic(g, gz))  # the learned bounds' d
    # without the start detector only input 0 is flagged: the learned bounds leave 1 and 2 alone
    alone = decide(g, gz, _null(), rule)
    assert alone.flagged.tolist() == [True, False, False]
    assert best_other_class(gz, np.zeros(3, dtype=np.int64)).tolist() == [2, 2, 2]


# --- calibration -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("start") / "art"
    manifest, report = _calibrate_tiny(
        out, "--start-detector", NO_RANGE, *SMALL, "--max-iters", "4", "--min-iters", "2"
    )
    return out, manifest, report


@pytest.fixture(scope="module")
def detect_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The same calibration stopped after its first iteration: the start detector's bounds."""
    out = tmp_path_factory.mktemp("detect") / "art"
    manifest, report = _calibrate_tiny(out, "--schedule", "detect", NO_RANGE, *SMALL)
    return out, manifest, report


@pytest.mark.slow
def test_the_artifact_carries_a_third_network_and_its_null(
    start_artifact: tuple[Path, dict, dict],
) -> None:
    from guard.artifact import START_SCHEMA_VERSION, load_artifact, sha256_file

    out, manifest, report = start_artifact
    assert manifest["schema_version"] == START_SCHEMA_VERSION
    entry = manifest["files"]["start"]
    assert entry["path"] == "start.onnx" and entry["sha256"] == sha256_file(out / "start.onnx")
    assert manifest["hyperparameters"]["start_detector"] is True
    assert manifest["start_detector"]["null"]["kind"] == "gpd"
    assert manifest["start_detector"]["null"]["n"] == 108
    assert report["iterations"] >= 2  # the learned bounds went on past the start bounds
    start = report["start_detector"]
    assert len(start["clean_statistics"]) == 108 and start["null"]["level"] == 0.0025
    assert report["null"]["level"] == 0.0025  # each statistic is tested at alpha / 2
    assert "start" in manifest["onnx"]["max_diff"]  # exported and checked like the rest
    art = load_artifact(out)
    assert art.start_path == out / "start.onnx" and art.start_null is not None
    assert art.start_null.kind == "gpd"
    md = (out / "report.md").read_text()
    assert "## Start detector" in md and "0.0025" in md


@pytest.mark.slow
def test_the_start_bounds_are_the_first_iterations_bounds(
    start_artifact: tuple[Path, dict, dict], detect_artifact: tuple[Path, dict, dict]
) -> None:
    """The start detector is `--schedule detect`'s bounded network, from the same calibration:
    the same bounds, and the same logits from its ONNX file."""
    import onnxruntime as ort

    out, _, report = start_artifact
    d_out, _, d_report = detect_artifact
    start_values = [row["values"] for row in report["start_detector"]["bounds"]]
    assert start_values == [row["values"] for row in d_report["bounds"]]
    assert start_values != [row["values"] for row in report["bounds"]]  # learned ones moved on
    x = np.concatenate([_poisoned(), _clean()[0][:16]])
    ours = ort.InferenceSession(str(out / "start.onnx"), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(d_out / "bounded.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        ours.run(None, {"input": x})[0], theirs.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_the_guard_combines_both_p_values(start_artifact: tuple[Path, dict, dict]) -> None:
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    out, _, _ = start_artifact
    art = load_artifact(out)
    engine = GuardEngine(art, "cpu", threads=1)
    x = np.concatenate([_poisoned(), _clean()[0]])
    g, gz, gs, _ = engine.logits(x)
    assert gs is not None and art.start_null is not None
    p_learned = p_values(art.null, statistic(g, gz))
    p_start = p_values(art.start_null, statistic(g, gs))
    d = engine.decide(x)
    np.testing.assert_allclose(d.p_value, np.minimum(1, 2 * np.minimum(p_learned, p_start)))
    flagged = (p_learned < art.rule.alpha / 2) | (p_start < art.rule.alpha / 2)
    assert d.flagged.tolist() == flagged.tolist()
    assert d.flagged.any() and not d.flagged.all()  # both outcomes occur on these inputs


def _infer(url: str, x: np.ndarray) -> Any:
    """One FP32 request for the artifact `art`, through stock tritonclient."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    try:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("art", [inp], client_timeout=60)
    finally:
        client.close()


@pytest.mark.slow
def test_a_real_server_serves_the_three_network_artifact(
    start_artifact: tuple[Path, dict, dict],
) -> None:

    from guard.artifact import load_artifact
    from guard.engine import GuardEngine
    from tests.serving import metadata_properties, running, serve_config

    out, manifest, _ = start_artifact
    x = np.concatenate([_poisoned()[:4], _clean()[0][:4]])
    expected = GuardEngine(load_artifact(out), "cpu", threads=1).decide(x)
    assert expected.flagged.any() and not expected.flagged.all()
    with running(serve_config(out)) as srv:
        info = next(m for m in srv.registry.collect() if m.name == "guard_build_info").samples[0]
        assert info.labels["start_sha256"] == manifest["files"]["start"]["sha256"]
        properties = metadata_properties(srv.url, "art")
        assert properties["start_detector"] == "gpd"
        assert properties["start_sha256"] == manifest["files"]["start"]["sha256"]
        res = _infer(srv.url, x)
    assert res.as_numpy("flagged").tolist() == expected.flagged.tolist()
    assert res.as_numpy("label").tolist() == expected.label.tolist()
    np.testing.assert_allclose(res.as_numpy("p_value"), expected.p_value, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
@requires_gpu
def test_the_three_networks_run_on_the_gpu(start_artifact: tuple[Path, dict, dict]) -> None:
    from guard.artifact import load_artifact
    from guard.config import BatchingConfig
    from guard.engine import CUDA, GuardEngine
    from tests.serving import running, serve_config

    out, _, _ = start_artifact
    art = load_artifact(out)
    gpu, cpu = GuardEngine(art, "cuda"), GuardEngine(art, "cpu", threads=1)
    assert len(gpu._sessions) == 3
    assert all(s.get_providers()[0] == CUDA for s in gpu._sessions)
    x = np.concatenate([_poisoned(), _clean()[0]])
    for on_gpu, on_cpu in zip(gpu.logits(x)[:3], cpu.logits(x)[:3], strict=True):
        np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
    g, c = gpu.decide(x), cpu.decide(x)
    assert g.label.tolist() == c.label.tolist() and g.flagged.tolist() == c.flagged.tolist()
    assert c.flagged.any() and not c.flagged.all()
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=2.0, warmup_batch_sizes=(1, 8))
    few = np.concatenate([_poisoned()[:4], _clean()[0][:4]])
    expected = cpu.decide(few)
    with running(serve_config(out, device="cuda", batching=batching)) as srv:
        info = next(m for m in srv.registry.collect() if m.name == "guard_build_info").samples[0]
        assert info.labels["provider"] == CUDA
        res = _infer(srv.url, few)
    assert res.as_numpy("flagged").tolist() == expected.flagged.tolist()
    assert res.as_numpy("label").tolist() == expected.label.tolist()


# --- refusals -----------------------------------------------------------------------------


def test_start_detector_refuses_mmom(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(_tiny_args(out, "--start-detector", "--objective", "mmom"))
    _assert_one_line_error(code, err, "start detector", "mmom")
    _nothing_written(tmp_path, out)


def test_start_detector_refuses_a_single_iteration(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(
        _tiny_args(out, "--start-detector", "--schedule", "detect", NO_RANGE, *SMALL)
    )
    _assert_one_line_error(code, err, "--start-detector", "one MMAC iteration")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("which", ["start", "range"])  # and tests/test_range_detector.py's
def test_an_extra_detector_needs_enough_heldout_images_for_its_null(
    tmp_path: Path, which: str
) -> None:
    """The start detector's null is fitted on the 48 held-out images of a default split; the
    range detector's on the learning images too, so it needs a smaller set to be refused (10
    per class: 16 held-out and 24 learning images)."""
    out = tmp_path / "art"
    if which == "start":
        code, _, err = run_cli(_tiny_args(out, "--start-detector"))
        _assert_one_line_error(code, err, "start detector's gpd null", "48", "--start-null")
    else:
        small = first_per_class(TINY / "clean.npz", 10, tmp_path / "small.npz")
        code, _, err = run_cli(_tiny_args(out, "--range-detector", "--data", str(small)))
        _assert_one_line_error(
            code, err, "range detector's gpd null", "16 held-out", "--range-null"
        )
    _nothing_written(tmp_path, out)


# --- the artifact's checks ----------------------------------------------------------------


@pytest.fixture()
def start_copy(start_artifact: tuple[Path, dict, dict], tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "copy"
    shutil.copytree(start_artifact[0], copy)
    yield copy


def _edit(root: Path, edit: object) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_tampered_start_network_is_refused(start_copy: Path) -> None:
    from guard.artifact import ArtifactError, load_artifact

    with (start_copy / "start.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"start\.onnx does not match the sha256"):
        load_artifact(start_copy)


@pytest.mark.slow
def test_schema_2_without_its_start_parts_is_refused(start_copy: Path) -> None:
    from guard.artifact import ArtifactError, load_artifact

    _edit(start_copy, lambda m: m.pop("start_detector"))
    with pytest.raises(ArtifactError, match=r"start_detector\.null"):
        load_artifact(start_copy)
    _edit(start_copy, lambda m: m["files"].pop("start"))
    with pytest.raises(ArtifactError, match=r"files\.start"):
        load_artifact(start_copy)


def _heldout(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, ...]:
    """Synthetic held-out logits (3 classes): original g, learned-bounded gz, labels y. Every
    image is class 0 with margin 5, and the learned bounds' d is N(1, 0.1)."""
    g = np.zeros((n, 3), dtype=np.float32)
    g[:, 0] = 5.0
    gz = g.copy()
    gz[:, 0] -= rng.normal(1.0, 0.1, n).astype(np.float32)
    return g, gz, np.zeros(n, dtype=np.int64)


def test_the_reports_false_positive_rate_is_the_combined_rules() -> None:
    """heldout_figures with the start detector's logits counts its flags too (cross-fitted)."""
    from calibrate.config import CalibrationConfig
    from calibrate.evaluation import cross_fitted_decisions, heldout_figures

    rng = np.random.default_rng(0)
    g, gz, y = _heldout(rng)
    n = len(y)
    gs = g.copy()
    gs[:, 0] -= rng.normal(1.0, 0.1, n).astype(np.float32)
    gs[:8, 0] -= 3.0  # eight images whose start statistic is 30 sigma out
    cfg = CalibrationConfig(null="gaussian", start_null="gaussian", start_detector=True)
    _, flagged = cross_fitted_decisions(g, gz, cfg, False, gs)
    _, flagged_alone = cross_fitted_decisions(g, gz, cfg, False)
    assert flagged[:8].all() and not flagged_alone[:8].any()
    both = heldout_figures(g, gz, y, cfg, gs)
    assert both["false_positive_rate"] == flagged.mean() >= 8 / n
    assert heldout_figures(g, gz, y, cfg)["false_positive_rate"] == flagged_alone.mean()
