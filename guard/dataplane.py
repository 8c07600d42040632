"""The transport-neutral core of the server: readiness, metadata and inference over plain
dataclasses (guard.tensors). guard.servicer converts protobuf to and from these and nothing else.

An inference request is validated and decoded, queued in the dynamic batcher, scored by both
networks and the MMDF decision in the executor, and its outputs encoded. Flagged inputs are
logged (one structured line each, never the data), counted and optionally quarantined.
Mode `unguarded` (a benchmark baseline with no protection) runs the original network alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import numpy as np

from guard.artifact import Artifact
from guard.batcher import Batcher
from guard.config import ServeConfig
from guard.engine import Outputs
from guard.errors import GuardError, InferenceFailed, ModelNotFound, NotReady
from guard.metrics import GuardMetrics
from guard.mmdf import DecisionRule, Decisions, decide
from guard.quarantine import Quarantine
from guard.tensors import (
    InferRequest,
    TensorMeta,
    TensorOut,
    decode_input,
    encode_output,
    output_specs,
    requested_outputs,
    to_pixels,
)

flag_log = logging.getLogger("guard.flagged")
SERVER_NAME = "mmguard"
PLATFORM = "onnxruntime_onnx"


def server_version() -> str:
    try:
        return version("mmguard")
    except PackageNotFoundError:
        return "unknown"


class Engine(Protocol):
    """What the data plane needs from guard.engine.GuardEngine (tests wrap or replace it)."""

    providers: list[str]

    def logits(self, x: np.ndarray) -> Outputs: ...

    def original_logits(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    properties: dict[str, str]


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: tuple[TensorOut, ...]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Scored:
    """One request's share of a batch: the MMDF decisions and the original network's logits."""

    decisions: Decisions
    original_logits: np.ndarray


def guarded_outputs(scored: Scored, shadow: bool) -> dict[str, np.ndarray]:
    """Output arrays by name. Shadow mode answers the original label and logits; everything
    else (flag, p-value, the would-be correction in bounded_label) is reported as in enforce."""
    d = scored.decisions
    return {
        "label": d.original_label if shadow else d.label,
        "flagged": d.flagged,
        "p_value": d.p_value.astype(np.float32),
        "statistic": d.statistic.astype(np.float32),
        "original_label": d.original_label,
        "bounded_label": d.bounded_label,
        "logits": scored.original_logits if shadow else d.logits,
    }


def unguarded(original_logits: np.ndarray) -> Decisions:
    """What mode `unguarded` answers: the original network's decision and logits, never flagged.
    No test runs, so p_value is NaN (not 1.0: no client may read it as evidence of a clean
    input); statistic 0 and bounded_label = original_label, as if the bounds changed nothing."""
    g = np.asarray(original_logits, dtype=np.float32)
    c = np.argmax(g, axis=1).astype(np.int64)
    n = len(c)
    nan, zero = np.full(n, np.nan), np.zeros(n)
    return Decisions(c, np.zeros(n, dtype=bool), nan, zero, c, c.copy(), g)


def split_scored(scored: Scored, sizes: Sequence[int]) -> list[Scored]:
    """Cut a batch's result into consecutive per-request parts of the given sizes."""
    parts, start = [], 0
    for size in sizes:
        cut = slice(start, start + size)
        d = Decisions(**{f.name: getattr(scored.decisions, f.name)[cut] for f in fields(Decisions)})
        parts.append(Scored(d, scored.original_logits[cut]))
        start += size
    return parts


class DataPlane:
    def __init__(
        self,
        *,
        artifact: Artifact,
        engine: Engine,
        config: ServeConfig,
        metrics: GuardMetrics,
        executor: Executor,
        quarantine: Quarantine | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.artifact = artifact
        self.engine = engine
        self.config = config
        self.rule: DecisionRule = config.decision_rule(artifact.rule)
        self.model_name = config.model_name or artifact.name
        self.metrics = metrics
        self.quarantine = quarantine
        self._executor = executor
        self._clock = clock
        self._outputs = output_specs(len(artifact.class_names))
        self._ready = False
        b = config.batching
        self.batcher: Batcher[np.ndarray, Scored] = Batcher(
            self._run_batch,
            max_batch_size=b.max_batch_size,
            max_delay_s=b.max_queue_delay_ms / 1000.0,
            max_queue_size=b.max_queue_size,
            clock=clock,
            observer=metrics,
        )
        metrics.watch_queue(lambda: self.batcher.depth)

    # lifecycle -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run every configured batch size once (blocking; call it in the executor)."""
        shape = self.artifact.input.shape
        for size in self.config.batching.warmup_sizes:
            self._score(np.zeros((size, *shape), dtype=np.float32), observe=False)

    def set_ready(self, ready: bool) -> None:
        if ready:
            self.batcher.start()
        else:
            self.batcher.drain()
        self._ready = ready

    # health and metadata ---------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready

    def model_ready(self, name: str, version: str) -> bool:
        self._check_model(name, version)
        return self._ready

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return SERVER_NAME, server_version(), ()

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        self._check_model(name, version)
        a = self.artifact
        spec = a.input
        datatypes = ["FP32", "UINT8"] if spec.accepts_uint8 else ["FP32"]
        properties = {
            "class_names": json.dumps(list(a.class_names)),
            "input_datatypes": json.dumps(datatypes),
            "input_value_range": json.dumps(list(spec.value_range)),
            "alpha": repr(self.rule.alpha),
            "flag_on_disagreement": str(self.rule.flag_on_disagreement).lower(),
            "mode": self.config.mode,
            "null": a.null.kind,
            "start_detector": "none" if a.start_null is None else a.start_null.kind,
            "range_detector": "none" if a.range_null is None else a.range_null.kind,
            "max_batch_size": str(self.config.batching.max_batch_size),
            "provider": self.engine.providers[0],
            "model_sha256": str(a.manifest["files"]["original"]["sha256"]),
            "bounded_sha256": str(a.manifest["files"]["bounded"]["sha256"]),
            # the trusted key whose signature over the manifest was verified at start
            "manifest_signed_by": a.signed_by or "",
        }
        if "start" in a.manifest["files"]:
            properties["start_sha256"] = str(a.manifest["files"]["start"]["sha256"])
        inputs = (TensorMeta(spec.name, "FP32", (-1, *spec.shape)),)
        versions = (self.config.model_version,)
        return ModelMetadata(self.model_name, versions, PLATFORM, inputs, self._outputs, properties)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in ("", self.config.model_version):
            raise ModelNotFound(
                f"unknown version {version!r} of model {name!r}; "
                f"served: {self.config.model_version!r}"
            )

    # inference -------------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        self._check_model(request.model_name, request.model_version)
        if not self._ready:
            raise NotReady(f"model {self.model_name!r} is not ready (warming up or stopping)")
        chosen = requested_outputs(request.outputs, self._outputs)
        x = decode_input(request, self.artifact.input, self.config.batching.max_batch_size)
        remaining = request.time_remaining_s
        deadline = None if remaining is None else self._clock() + remaining
        scored = await self.batcher.submit(to_pixels(x), len(x), deadline)
        request_id = request.id or uuid.uuid4().hex
        self._report(request_id, x, scored)
        arrays = guarded_outputs(scored, self.config.mode == "shadow")
        return InferResponse(
            model_name=self.model_name,
            model_version=self.config.model_version,
            id=request.id,
            outputs=tuple(encode_output(meta, arrays[meta.name]) for meta in chosen),
            parameters={"guard_mode": self.config.mode, "guard_request_id": request_id},
        )

    async def _run_batch(self, xs: list[np.ndarray]) -> list[Scored]:
        loop = asyncio.get_running_loop()
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        try:
            scored = await loop.run_in_executor(self._executor, self._score, x)
        except GuardError:
            raise
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc
        return split_scored(scored, [len(part) for part in xs])

    def _score(self, x: np.ndarray, observe: bool = True) -> Scored:
        """The artifact's networks (two, or three with a start detector), then MMDF, on one
        batch (runs on an executor thread); the original network alone in mode unguarded."""
        t0 = self._clock()
        start = ratios = None
        if self.config.mode == "unguarded":
            original = bounded = self.engine.original_logits(x)
        else:
            original, bounded, start, ratios = self.engine.logits(x)
        t1 = self._clock()
        expected = (len(x), len(self.artifact.class_names))
        shapes = [a.shape for a in (original, bounded, start) if a is not None]
        if any(shape != expected for shape in shapes):
            raise InferenceFailed(
                f"the networks returned logits of shapes {', '.join(map(str, shapes))}; "
                f"expected {expected}"
            )
        if ratios is not None and (ratios.ndim != 2 or ratios.shape[0] != len(x)):
            raise InferenceFailed(
                f"the original network returned activation ratios of shape {ratios.shape}; "
                f"expected ({len(x)}, sites)"
            )
        if self.config.mode == "unguarded":
            decisions = unguarded(original)
        else:
            a = self.artifact
            detectors = (a.start_detector(start), a.range_detector(ratios))
            decisions = decide(original, bounded, a.null, self.rule, *detectors)
        if observe:
            self.metrics.on_stage("inference", t1 - t0)
            self.metrics.on_stage("decision", self._clock() - t1)
        return Scored(decisions, np.asarray(original, dtype=np.float32))

    def _report(self, request_id: str, x: np.ndarray, scored: Scored) -> None:
        """Count the decisions; log and quarantine each flagged input."""
        d = scored.decisions
        if self.config.mode == "unguarded":  # no test ran: no p-values or statistics to count
            self.metrics.inferences.inc(len(d.label))
            return
        self.metrics.on_decisions(d)
        names = self.artifact.class_names
        for i in np.flatnonzero(d.flagged).tolist():
            record = {
                "request_id": request_id,
                "item": i,
                "model": self.model_name,
                "mode": self.config.mode,
                "original_class": names[int(d.original_label[i])],
                "corrected_class": names[int(d.label[i])],
                "p_value": float(d.p_value[i]),
                "statistic": float(d.statistic[i]),
            }
            flag_log.warning("flagged input", extra={"fields": record})
            if self.quarantine is not None:
                self.quarantine.submit(x[i], record)
