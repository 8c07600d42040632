"""Server interceptors. CallTracker sees every call as it reaches the application (the
shutdown waits on it). StatusInterceptor is the one place where a GuardError becomes a gRPC
status (any other exception becomes INTERNAL and is logged) and where every inference-service
RPC is counted and timed. AuthInterceptor checks the bearer token before any handler runs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from guard.errors import GuardError, Unauthenticated
from guard.metrics import GuardMetrics

log = logging.getLogger("guard.server")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _unary_handler(handler: Any, fn: Callable[..., Awaitable[Any]]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class CallTracker(grpc.aio.ServerInterceptor):
    """When a call last reached the application (any method, authorized or not) and how many
    unary calls are running. Put it first, so that it sees every call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.running = 0
        self.last_arrival = float("-inf")  # on `clock`

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        self.last_arrival = self._clock()
        handler: Any = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.running += 1
            try:
                return await inner(request, context)
            finally:
                self.running -= 1

        return _unary_handler(handler, tracked)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to status codes and records guard_requests_total and request latency for the
    unary RPCs of the services under `prefix`."""

    def __init__(
        self,
        metrics: GuardMetrics,
        prefix: str = "/inference.GRPCInferenceService/",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._metrics = metrics
        self._prefix = prefix
        self._clock = clock

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler: Any = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        if not details.method.startswith(self._prefix):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics, clock = self._metrics, self._clock

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # metrics are recorded before the answer leaves, so a client that has its answer
            # sees them counted
            start = clock()
            metrics.in_flight.inc()

            def finish(code: grpc.StatusCode) -> None:
                metrics.in_flight.dec()
                metrics.on_request(method, code, clock() - start)

            try:
                response = await inner(request, context)
            except GuardError as exc:
                code, message = exc.code, exc.message
            except grpc.aio.AbortError:  # a handler aborted by itself: its status stands
                finish(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                finish(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method}; see the server log"
            else:
                finish(grpc.StatusCode.OK)
                return response
            finish(code)
            await context.abort(code, message)

        return _unary_handler(handler, guarded)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every RPC except the health service,
    which Kubernetes probes call without credentials."""

    def __init__(self, token: str, exempt: tuple[str, ...] = ("/grpc.health.v1.Health/",)) -> None:
        self._token = token.encode()
        self._exempt = exempt

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, credential = value.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode(), self._token
            ):
                return True
        return False

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler: Any = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
        if handler.unary_unary is not None:

            async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                raise Unauthenticated(message)  # StatusInterceptor counts and maps it

            return _unary_handler(handler, deny_unary)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kind = "stream_stream" if handler.stream_stream else "unary_stream"
        if handler.stream_unary:
            kind = "stream_unary"
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
