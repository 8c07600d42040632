"""Prometheus metrics of the guard, every one on an injected CollectorRegistry (never the global
one), so a test builds a fresh registry and reads samples with `registry.get_sample_value`.

Naming follows Prometheus conventions: `guard_` prefix, counters end in `_total`, durations are
`_seconds` histograms in base units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guard.mmdf import Decisions, Null

LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
P_VALUE_BUCKETS = (1e-12, 1e-9, 1e-6, 1e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
# statistic buckets at these many null standard deviations from the null mean
STATISTIC_Z = (-2.0, -1.0, 0.0, 1.0, 2.0, 2.576, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0)

_OUTCOMES = {
    grpc.StatusCode.OK: "success",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.UNAVAILABLE: "rejected",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "cancelled",
}


def outcome(code: grpc.StatusCode) -> str:
    """success, invalid, unauthenticated, rejected (overload or not ready), cancelled (by the
    client or its deadline) or error (the server failed)."""
    return _OUTCOMES.get(code, "error")


def statistic_buckets(null: Null) -> tuple[float, ...]:
    """Bucket bounds around the fitted null: mu + z * sigma, so the alpha threshold region is
    resolved whatever the model's logit scale."""
    if not (math.isfinite(null.sigma) and null.sigma > 0):
        return (-1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    return tuple(sorted({round(null.mu + z * null.sigma, 6) for z in STATISTIC_Z}))


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(float(s) for s in sorted(sizes))


class GuardMetrics:
    """Every metric the server exports. Also the batcher's observer (on_queued, on_batch,
    on_dropped)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        class_names: Sequence[str],
        null: Null,
        max_batch_size: int,
    ) -> None:
        self.class_names = tuple(class_names)
        self._traffic(registry, max_batch_size)
        self._decisions(registry, null)
        self.build_info = Gauge(
            "guard_build_info",
            "Always 1: server version, onnxruntime provider in use, model (start_sha256 is empty "
            "without a start detector)",
            [
                "version",
                "provider",
                "model",
                "model_sha256",
                "bounded_sha256",
                "start_sha256",
                "mode",
            ],
            registry=registry,
        )

    def _traffic(self, r: CollectorRegistry, max_batch_size: int) -> None:
        self.requests = Counter(
            "guard_requests",
            "RPCs answered, by method, outcome and gRPC status code",
            ["method", "outcome", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "guard_request_duration_seconds",
            "Time to answer an RPC",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "guard_stage_duration_seconds",
            "Time per stage: queue (per request), inference and decision (per batch)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "guard_batch_size",
            "Inputs per inference call",
            buckets=batch_buckets(max_batch_size),
            registry=r,
        )
        self.dropped = Counter(
            "guard_dropped_requests", "Requests dropped before inference", ["reason"], registry=r
        )
        self.queue_depth = Gauge("guard_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("guard_inflight_requests", "Inference RPCs in progress", registry=r)
        for reason in ("cancelled", "deadline"):
            self.dropped.labels(reason)
        for stage in ("queue", "inference", "decision"):
            self.stage_seconds.labels(stage)

    def _decisions(self, r: CollectorRegistry, null: Null) -> None:
        self.inferences = Counter("guard_inferences", "Inputs scored (items)", registry=r)
        self.flagged = Counter("guard_flagged", "Inputs flagged (shadow mode too)", registry=r)
        self.corrections = Counter(
            "guard_corrections",
            "Flagged inputs by original and corrected class",
            ["original_class", "corrected_class"],
            registry=r,
        )
        self.p_value = Histogram(
            "guard_p_value", "MMDF p-value per input", buckets=P_VALUE_BUCKETS, registry=r
        )
        self.statistic = Histogram(
            "guard_statistic",
            "MMDF statistic d(x) per input (logit units)",
            buckets=statistic_buckets(null),
            registry=r,
        )

    def set_build_info(self, **labels: str) -> None:
        self.build_info.labels(**labels).set(1)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def on_request(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, outcome(code), code.name).inc()
        self.request_seconds.labels(method).observe(seconds)

    def on_queued(self, wait_s: float) -> None:
        self.stage_seconds.labels("queue").observe(wait_s)

    def on_batch(self, items: int) -> None:
        self.batch_size.observe(items)

    def on_dropped(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def on_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def on_decisions(self, d: Decisions) -> None:
        """Count one request's scored inputs, flags and corrections."""
        self.inferences.inc(len(d.label))
        for p, s in zip(d.p_value.tolist(), d.statistic.tolist(), strict=True):
            self.p_value.observe(p)
            self.statistic.observe(s)
        for i in np.flatnonzero(d.flagged).tolist():
            self.flagged.inc()
            original = self.class_names[int(d.original_label[i])]
            corrected = self.class_names[int(d.label[i])]
            self.corrections.labels(original, corrected).inc()
