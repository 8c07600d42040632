"""The grpc.health.v1 service (Check and Watch) of the guard server.

It replaces grpcio-health-checking's asyncio servicer, which has two faults that matter in a
graceful shutdown:

- a Watch stream never ends by itself, so one open stream (gRPC client-side health checking
  keeps one per connection) holds `grpc.aio.Server.stop(grace)` for the whole grace period even
  when no request is left, and the process exits only when the grace runs out;
- its watchers of a service share one condition that the first stream to close deletes, so the
  other streams of that service are never told of a later change, NOT_SERVING at shutdown
  included.

Here every stream waits on one condition that lives as long as the service, and once shutdown
begins each stream is sent NOT_SERVING and then ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    """Statuses by service name ("" is the whole server); `set` them, and call
    `enter_graceful_shutdown` when the server begins to stop: every status becomes NOT_SERVING
    for good and every Watch stream ends once it has said so."""

    def __init__(self) -> None:
        self._status: dict[str, Any] = {}
        self._changed = asyncio.Condition()
        self._version = 0  # bumped on every change, so a waiting stream cannot miss one
        self._stopping = False

    def status(self, service: str = "") -> Any:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def set(self, service: str, status: Any) -> None:
        """Set a service's status; ignored once shutdown has begun (NOT_SERVING is final)."""
        async with self._changed:
            if self._stopping:
                return
            self._status[service] = status
            self._version += 1
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        async with self._changed:
            if self._stopping:
                return
            self._stopping = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._version += 1
            self._changed.notify_all()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """The current status at once, then each change; after shutdown begins, NOT_SERVING
        (unless already sent) and the end of the stream. The lock is never held while writing,
        so a slow reader delays no one."""
        sent = None
        seen = -1
        while True:
            async with self._changed:
                while self._version == seen:
                    await self._changed.wait()
                seen = self._version
                status = self.status(request.service)
                stopping = self._stopping
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if stopping:
                return
