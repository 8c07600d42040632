"""guard.health.HealthService on a bare gRPC server (no artifact): Check and Watch, every watcher
told of every change even after another watcher left, and at shutdown each Watch stream sent
NOT_SERVING and then ended, so an open stream no longer holds a graceful stop for its whole
grace period (both were faults of grpcio-health-checking's asyncio servicer)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthService

pytestmark = pytest.mark.reliability


class HealthServer:
    """A grpc.aio server with only the health service, on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.health, self.server, port = self.call(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    async def _start(self) -> tuple[HealthService, grpc.aio.Server, int]:
        health = HealthService()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return health, server, port

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def watch(self, service: str = "") -> Any:
        return self.stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture()
def hs() -> Iterator[HealthServer]:
    server = HealthServer()
    try:
        yield server
    finally:
        server.close()


def _check(hs: HealthServer, service: str = "") -> int:
    return hs.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_check_answers_the_set_status_and_not_found_for_an_unknown_service(
    hs: HealthServer,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _check(hs)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    hs.call(hs.health.set("", NOT_SERVING))
    assert _check(hs) == NOT_SERVING
    hs.call(hs.health.set("", SERVING))
    assert _check(hs) == SERVING


def test_every_watcher_sees_every_change_after_another_watcher_left(hs: HealthServer) -> None:
    hs.call(hs.health.set("svc", NOT_SERVING))
    first, second = hs.watch("svc"), hs.watch("svc")
    assert next(first).status == NOT_SERVING and next(second).status == NOT_SERVING
    unknown = hs.watch("other")
    assert next(unknown).status == SERVICE_UNKNOWN
    first.cancel()
    time.sleep(0.2)  # the server sees the first stream end
    hs.call(hs.health.set("svc", SERVING))
    assert next(second).status == SERVING
    hs.call(hs.health.set("svc", NOT_SERVING))
    assert next(second).status == NOT_SERVING
    second.cancel()
    unknown.cancel()


def test_shutdown_sends_not_serving_then_ends_the_streams_and_stop_does_not_wait(
    hs: HealthServer,
) -> None:
    hs.call(hs.health.set("", SERVING))
    watchers = [hs.watch() for _ in range(3)]
    assert [next(w).status for w in watchers] == [SERVING] * 3
    hs.call(hs.health.enter_graceful_shutdown())
    for w in watchers:
        assert [m.status for m in w] == [NOT_SERVING]  # then the stream ends, status OK
        assert w.code() == grpc.StatusCode.OK
    hs.call(hs.health.set("", SERVING))  # NOT_SERVING is final
    assert _check(hs) == NOT_SERVING
    late = hs.watch()
    assert [m.status for m in late] == [NOT_SERVING]
    started = time.monotonic()
    hs.call(hs.server.stop(30))
    assert time.monotonic() - started < 5  # no stream left to wait for
