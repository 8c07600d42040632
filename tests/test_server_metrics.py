"""Metric values after known traffic, read from the injected registry, and `promtool check
metrics` on a real scrape of the /metrics endpoint."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.conftest import Samples
from tests.prometheus import promtool
from tests.serving import ServerThread, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
CLASSES = ["stripes_h", "stripes_v", "blob", "rings"]


def _infer(client: tc.InferenceServerClient, x: np.ndarray, model: str = MODEL) -> tc.InferResult:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], client_timeout=30)


@pytest.fixture(scope="module")
def traffic(artifact_dir: Path, samples: Samples) -> Iterator[tuple[ServerThread, dict]]:
    """A server with a metrics endpoint after: 4 triggered inputs in one request, 4 clean ones
    in another, one request with NaN and one for an unknown model."""
    with running(serve_config(artifact_dir, metrics_port=0)) as srv:
        client = tc.InferenceServerClient(srv.url)
        bad = _infer(client, samples.triggered)
        good = _infer(client, samples.clean)
        for x, model in ((np.full_like(samples.clean[:1], np.nan), MODEL), (samples.clean, "x")):
            with pytest.raises(InferenceServerException):
                _infer(client, x, model)
        client.close()
        yield srv, {"triggered": bad, "clean": good}


def test_metric_values_after_known_traffic(
    traffic: tuple[ServerThread, dict], artifact_dir: Path
) -> None:
    srv, results = traffic
    s = srv.sample
    assert s("guard_requests_total", method="ModelInfer", outcome="success", code="OK") == 2
    assert s("guard_requests_total", method="ModelInfer", outcome="invalid",
             code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert s("guard_requests_total", method="ModelInfer", outcome="invalid",
             code="NOT_FOUND") == 1  # fmt: skip
    assert s("guard_request_duration_seconds_count", method="ModelInfer") == 4
    assert s("guard_inferences_total") == 8
    assert s("guard_flagged_total") == 4
    corrected = results["triggered"].as_numpy("label").tolist()
    for cls in set(corrected):
        count = s("guard_corrections_total", original_class="stripes_h",
                  corrected_class=CLASSES[cls])  # fmt: skip
        assert count == corrected.count(cls)
    assert s("guard_p_value_count") == 8
    assert s("guard_p_value_bucket", le="0.005") == 4  # the triggered ones
    assert s("guard_statistic_count") == 8
    # d(x) can be negative, so its buckets start below 0 and, as OpenMetrics requires,
    # client_python exports no _sum for it; the buckets still place every input
    assert s("guard_statistic_bucket", le="+Inf") == 8
    threshold = json.loads((artifact_dir / "manifest.json").read_text())["null"]["threshold"]
    below = sum(int(np.sum(r.as_numpy("statistic") < threshold)) for r in results.values())
    assert below >= 4  # at least the clean ones sit under the alpha threshold
    assert s("guard_batch_size_count") == 2 and s("guard_batch_size_sum") == 8
    for stage in ("queue", "inference", "decision"):  # the warm-up is not counted
        assert s("guard_stage_duration_seconds_count", stage=stage) == 2
    assert s("guard_queue_depth") == 0 and s("guard_inflight_requests") == 0
    files = json.loads((artifact_dir / "manifest.json").read_text())["files"]
    info = next(m for m in srv.registry.collect() if m.name == "guard_build_info").samples[0]
    assert info.value == 1
    assert info.labels["provider"] == "CPUExecutionProvider"
    assert info.labels["model"] == MODEL and info.labels["mode"] == "enforce"
    assert info.labels["model_sha256"] == files["original"]["sha256"]
    assert info.labels["bounded_sha256"] == files["bounded"]["sha256"]
    assert info.labels["start_sha256"] == ""  # no start detector in this artifact
    assert info.labels["version"]


def _scrape(srv: ServerThread) -> str:
    port = srv.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_promtool_accepts_a_real_scrape(traffic: tuple[ServerThread, dict]) -> None:
    srv, _ = traffic
    text = _scrape(srv)
    for name in ("guard_requests_total", "guard_flagged_total", "guard_corrections_total",
                 "guard_p_value_bucket", "guard_request_duration_seconds_bucket",
                 "guard_stage_duration_seconds_bucket", "guard_batch_size_bucket",
                 "guard_queue_depth", "guard_inflight_requests", "guard_build_info",
                 "guard_inferences_total", "guard_statistic_bucket"):  # fmt: skip
        assert f"\n{name}" in text, name
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_metrics_endpoint_closes_a_connection_that_says_nothing() -> None:
    import socket
    import time
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from guard.metrics_http import start_metrics_server

    registry = CollectorRegistry()
    Counter("guard_probe", "a probe", registry=registry).inc(3)
    httpd, thread = start_metrics_server(0, "127.0.0.1", registry, timeout_s=0.3)
    try:
        port = httpd.server_port
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        assert stalled.recv(1) == b""  # the server hung up on it
        assert 0.2 < time.monotonic() - t0 < 4
        stalled.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert "guard_probe_total 3.0" in resp.read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
    thread.join(5)
    assert not thread.is_alive()
