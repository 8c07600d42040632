"""Operations through the real server: health and readiness transitions around the warm-up and
the shutdown (an in-flight request completes), the quarantine of flagged inputs. (The maximum
message size: tests/test_reliability_faults.py.)"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from guard.config import QuarantineConfig
from tests.conftest import Samples
from tests.serving import ServerThread, fire, gated_factory, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(stub: Any, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _fire(client: tc.InferenceServerClient, x: np.ndarray) -> Future[tc.InferResult]:
    return fire(client, x, client_timeout=60)


def test_health_follows_warm_up_and_shutdown_and_in_flight_requests_finish(
    artifact_dir: Path, samples: Samples
) -> None:
    factory, engines = gated_factory()
    srv = ServerThread(serve_config(artifact_dir), factory)
    engine = engines[0]
    engine.gate.clear()  # hold the warm-up
    starting = srv.submit(srv.server.start())
    channel = grpc.insecure_channel(srv.url)
    client = tc.InferenceServerClient(srv.url)
    try:
        assert engine.entered.acquire(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == NOT_SERVING
        assert _check(health, "inference.GRPCInferenceService") == NOT_SERVING
        assert client.is_server_live() and not client.is_server_ready()
        assert not client.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as info:
            _fire(client, samples.clean[:1]).result(timeout=30)
        assert info.value.status() == "StatusCode.UNAVAILABLE"

        engine.gate.set()  # warm-up completes
        starting.result(timeout=30)
        assert next(watch).status == SERVING
        assert _check(health) == SERVING and client.is_server_ready()

        engine.reset()
        engine.gate.clear()
        in_flight = _fire(client, samples.triggered[:1])
        assert engine.entered.acquire(timeout=30)
        stopping = srv.submit(srv.server.stop(grace_s=30))
        assert next(watch).status == NOT_SERVING  # at once, while the request still runs
        watch.cancel()
        assert not in_flight.done()
        engine.gate.set()
        result = in_flight.result(timeout=30)
        assert result.as_numpy("flagged").tolist() == [True]
        stopping.result(timeout=30)
        with pytest.raises(InferenceServerException):
            client.is_server_live()  # the port is closed
    finally:
        engine.gate.set()
        client.close()
        channel.close()
        srv.stop()


def test_calls_that_reach_the_server_as_it_stops_are_refused_unavailable_not_cancelled(
    artifact_dir: Path, samples: Samples
) -> None:
    """Calls that gRPC has received but not yet handed to the application when the shutdown
    begins (here: the event loop is held while they arrive) get UNAVAILABLE, which tells a
    client to retry elsewhere; gRPC's own stop would cancel them (CANCELLED)."""
    srv = ServerThread(serve_config(artifact_dir))
    client = tc.InferenceServerClient(srv.url)
    holding, release = threading.Event(), threading.Event()

    async def stop_after_holding_the_loop() -> None:
        holding.set()
        release.wait(30)  # blocks the loop: arriving calls wait inside gRPC
        await srv.server.stop(grace_s=10)

    try:
        srv.start()
        _fire(client, samples.clean[:1]).result(timeout=30)  # connected and answering
        stopping = srv.submit(stop_after_holding_the_loop())
        assert holding.wait(30)
        calls = [_fire(client, samples.clean[:1]) for _ in range(16)]
        time.sleep(0.5)  # let them reach the server
        release.set()
        stopping.result(timeout=30)
        outcomes = []
        for call in calls:
            with pytest.raises(InferenceServerException) as info:
                call.result(timeout=30)
            outcomes.append((info.value.status(), info.value.message()))
        assert {status for status, _ in outcomes} == {"StatusCode.UNAVAILABLE"}, outcomes
        assert all("not ready" in message for _, message in outcomes), outcomes
    finally:
        release.set()
        client.close()
        srv.stop()


def test_flagged_inputs_are_quarantined(
    artifact_dir: Path, samples: Samples, tmp_path: Path
) -> None:
    qdir = tmp_path / "quarantine"
    config = serve_config(artifact_dir, quarantine=QuarantineConfig(qdir, max_bytes=1 << 20))
    with running(config) as srv:
        client = tc.InferenceServerClient(srv.url)
        _fire(client, samples.clean).result(timeout=30)  # nothing flagged, nothing kept
        _fire(client, samples.triggered[:2]).result(timeout=30)
        client.close()
        deadline = time.monotonic() + 30
        while srv.sample("guard_quarantined_total") < 2:
            assert time.monotonic() < deadline, "the quarantine never wrote"
            time.sleep(0.02)
    files = sorted(qdir.glob("*.npz"))
    assert len(files) == 2
    for i, path in enumerate(files):
        with np.load(path) as f:
            np.testing.assert_array_equal(f["input"], samples.triggered[i])
            meta = json.loads(str(f["meta"]))
        assert meta["item"] == i and meta["p_value"] < 0.005
        assert meta["original_class"] == "stripes_h"
