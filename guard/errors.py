"""The serving side's one error hierarchy: each error carries its message and its gRPC status
code, and one interceptor (guard.interceptors.StatusInterceptor) turns it into the RPC status.

The core raises these and nothing else crosses the transport boundary as a status: any other
exception reaching the interceptor is answered INTERNAL with a generic message and logged.
"""

from __future__ import annotations

import grpc


class GuardError(Exception):
    """Base of every error the server answers with a status code other than INTERNAL's
    catch-all. `message` is what the client reads; it names the problem, never the input."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(GuardError):
    """The request is malformed: wrong input name, datatype, shape, byte length, values."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(GuardError):
    """The request names a model or version this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(GuardError):
    """The batching queue is at --max-queue-size; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(GuardError):
    """The server is warming up or shutting down and takes no inference requests."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GuardError):
    """The request's deadline passed while it waited for a batch; it was not run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(GuardError):
    """The bearer token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class InferenceFailed(GuardError):
    """Running the networks or the decision failed; every request of the batch gets it."""

    code = grpc.StatusCode.INTERNAL
