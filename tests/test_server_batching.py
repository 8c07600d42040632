"""Dynamic batching through the real server: concurrent requests merge (seen in the batch-size
histogram), a full queue answers RESOURCE_EXHAUSTED, a failing batch fails each of its requests,
and requests cancelled or past their deadline are dropped before inference. The engine waits on
a gate the test opens, so nothing depends on timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from guard.config import BatchingConfig
from tests.conftest import Samples
from tests.serving import GatedEngine, ServerThread, fire, gated_factory, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"


class Gated:
    def __init__(self, server: ServerThread, engine: GatedEngine) -> None:
        self.server = server
        self.engine = engine
        self.client = tc.InferenceServerClient(server.url)
        engine.reset()  # forget the warm-up

    def fire(self, x: np.ndarray, **kw: Any) -> Future[tc.InferResult]:
        """Send without waiting; the future resolves with the result or the error."""
        return fire(self.client, x, **kw)

    def hold_first(self, x: np.ndarray) -> Future[tc.InferResult]:
        """Close the gate and send a request; returns once its batch is inside the engine."""
        self.engine.gate.clear()
        fut = self.fire(x)
        assert self.engine.entered.acquire(timeout=30), "the first batch never started"
        return fut

    def wait_queue(self, depth: int) -> None:
        deadline = time.monotonic() + 30
        while self.server.sample("guard_queue_depth") != depth:
            assert time.monotonic() < deadline, f"queue depth never reached {depth}"
            time.sleep(0.01)


@pytest.fixture()
def gated(artifact_dir: Path, request: pytest.FixtureRequest) -> Iterator[Gated]:
    batching = getattr(request, "param", None) or BatchingConfig(
        max_batch_size=8, max_queue_delay_ms=1.0, max_queue_size=16, warmup_batch_sizes=(1,)
    )
    factory, engines = gated_factory()
    with running(serve_config(artifact_dir, batching=batching), factory) as srv:
        g = Gated(srv, engines[0])
        try:
            yield g
        finally:
            g.engine.gate.set()
            g.client.close()


def test_concurrent_requests_merge_into_one_batch(gated: Gated, samples: Samples) -> None:
    first = gated.hold_first(samples.clean[:1])
    rest = [gated.fire(samples.clean[:2]), gated.fire(samples.triggered[:1])]
    rest.append(gated.fire(samples.clean[2:4]))
    gated.wait_queue(3)
    gated.engine.gate.set()
    results = [f.result(timeout=30) for f in [first, *rest]]
    assert gated.engine.batches == [1, 5]  # 2 + 1 + 2 inputs in the second call
    assert [len(r.as_numpy("label")) for r in results] == [1, 2, 1, 2]
    assert results[2].as_numpy("flagged").tolist() == [True]
    assert results[1].as_numpy("flagged").tolist() == [False, False]
    s = gated.server.sample
    assert s("guard_batch_size_count") == 2 and s("guard_batch_size_sum") == 6
    assert s("guard_batch_size_bucket", le="1.0") == 1
    assert s("guard_batch_size_bucket", le="4.0") == 1
    assert s("guard_batch_size_bucket", le="8.0") == 2
    assert s("guard_stage_duration_seconds_count", stage="queue") == 4
    assert s("guard_queue_depth") == 0 and s("guard_inflight_requests") == 0


def test_batches_never_exceed_the_maximum(gated: Gated, samples: Samples) -> None:
    first = gated.hold_first(samples.clean[:1])
    x = np.concatenate([samples.clean, samples.clean])[:6]
    rest = [gated.fire(x), gated.fire(x[:3]), gated.fire(x[:2])]
    gated.wait_queue(3)
    gated.engine.gate.set()
    for f in [first, *rest]:
        f.result(timeout=30)
    assert gated.engine.batches == [1, 6, 5]  # 6 + 3 would exceed 8: the 3 waits for the next


@pytest.mark.parametrize(
    "gated",
    [BatchingConfig(max_batch_size=8, max_queue_delay_ms=1.0, max_queue_size=2,
                    warmup_batch_sizes=(1,))],
    indirect=True,
)  # fmt: skip
def test_a_full_queue_answers_resource_exhausted(gated: Gated, samples: Samples) -> None:
    first = gated.hold_first(samples.clean[:1])
    queued = [gated.fire(samples.clean[:1]), gated.fire(samples.clean[:1])]
    gated.wait_queue(2)
    with pytest.raises(InferenceServerException) as info:
        gated.fire(samples.clean[:1]).result(timeout=30)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "queue is full" in info.value.message()
    gated.engine.gate.set()
    for f in [first, *queued]:
        assert f.result(timeout=30).as_numpy("label").shape == (1,)
    assert gated.server.sample(
        "guard_requests_total", method="ModelInfer", outcome="rejected", code="RESOURCE_EXHAUSTED"
    ) == 1  # fmt: skip


def test_a_failing_batch_fails_each_of_its_requests_and_serving_goes_on(
    gated: Gated, samples: Samples
) -> None:
    first = gated.hold_first(samples.clean[:1])
    queued = [gated.fire(samples.clean[:1]), gated.fire(samples.clean[:2])]
    gated.wait_queue(2)
    gated.engine.fail_with = RuntimeError("device lost")
    gated.engine.gate.set()
    messages = set()
    for f in [first, *queued]:
        with pytest.raises(InferenceServerException) as info:
            f.result(timeout=30)
        assert info.value.status() == "StatusCode.INTERNAL"
        messages.add(info.value.message())
    assert messages == {"inference failed: RuntimeError: device lost"}
    assert gated.engine.batches == [1, 3]
    gated.engine.fail_with = None
    assert gated.fire(samples.clean[:1]).result(timeout=30).as_numpy("label").shape == (1,)


def test_cancelled_and_expired_requests_are_dropped_before_inference(
    gated: Gated, samples: Samples
) -> None:
    first = gated.hold_first(samples.clean[:1])
    cancelled = gated.fire(samples.clean[:3])
    kept = gated.fire(samples.clean[:1])
    expiring = gated.fire(samples.clean[:2], client_timeout=3.0)
    gated.wait_queue(3)
    cancelled.ctx.cancel()  # type: ignore[attr-defined]
    with pytest.raises(InferenceServerException) as info:
        expiring.result(timeout=30)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    gated.wait_queue(1)  # both left the queue without running
    gated.engine.gate.set()
    first.result(timeout=30)
    assert kept.result(timeout=30).as_numpy("label").shape == (1,)
    assert gated.engine.batches == [1, 1]
    dropped = gated.server.sample("guard_dropped_requests_total", reason="cancelled")
    assert dropped == 2
