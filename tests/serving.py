"""Helpers for the serving tests: the real server on port 0 in a thread of its own (so that the
blocking stock tritonclient can call it), configurations, an engine with a gate, raw stubs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from guard.artifact import Artifact
from guard.config import BatchingConfig, ServeConfig
from guard.engine import Outputs
from guard.server import EngineFactory, GuardServer, create_server, default_engine


def serve_config(artifact_dir: Path, **overrides: Any) -> ServeConfig:
    """Loopback, port 0, no metrics endpoint, one onnxruntime thread (the machine is shared)."""
    batching = overrides.pop(
        "batching",
        BatchingConfig(max_batch_size=8, max_queue_delay_ms=1.0, warmup_batch_sizes=(1,)),
    )
    base = ServeConfig(
        artifact_dir=artifact_dir,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        device="cpu",
        threads=1,
        batching=batching,
        shutdown_grace_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


class ServerThread:
    """create_server + start on an event loop in a background thread."""

    def __init__(self, config: ServeConfig, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        factory = engine_factory or default_engine
        try:
            self.server: GuardServer
            self.server, self.port = self.call(
                create_server(config, registry=self.registry, engine_factory=factory)
            )
        except BaseException:
            self._close_loop()
            raise
        self.url = f"127.0.0.1:{self.port}"

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        return self.submit(coro).result(timeout_s)

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace_s: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace_s))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.contextmanager
def running(
    config: ServeConfig, engine_factory: EngineFactory | None = None
) -> Iterator[ServerThread]:
    server = ServerThread(config, engine_factory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class GatedEngine:
    """The real engine, with a gate each batch waits on and a log of batch sizes."""

    def __init__(self, artifact: Artifact, device: Any, threads: int) -> None:
        from guard.engine import GuardEngine

        self._engine = GuardEngine(artifact, device, threads)
        self.providers = self._engine.providers
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)  # released once per batch that starts
        self.batches: list[int] = []
        self.fail_with: Exception | None = None

    def reset(self) -> None:
        """Forget the batches so far (the warm-up's among them)."""
        self.batches.clear()
        while self.entered.acquire(blocking=False):
            pass

    def logits(self, x: np.ndarray) -> Outputs:
        self.batches.append(len(x))
        self.entered.release()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if self.fail_with is not None:
            raise self.fail_with
        return self._engine.logits(x)

    def original_logits(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x)[0]


def gated_factory() -> tuple[EngineFactory, list[GatedEngine]]:
    """An engine factory and the list that will hold the engine it builds."""
    made: list[GatedEngine] = []

    def factory(artifact: Artifact, device: Any, threads: int) -> GatedEngine:
        engine = GatedEngine(artifact, device, threads)
        made.append(engine)
        return engine

    return factory, made


def raw_stub(url: str) -> tuple[grpc.Channel, Any]:
    """A plain channel and the stub tritonclient ships (its stock messages)."""
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_request(model: str, x: np.ndarray, datatype: str = "FP32", **fields: Any) -> Any:
    """A stock ModelInferRequest carrying `x` raw."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model, **fields)
    req.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return req


def fire(client: Any, x: np.ndarray, model: str = "tiny", **kw: Any) -> Future[Any]:
    """tritonclient's async_infer as a future (result or InferenceServerException); the call
    context, for cancel(), is on `future.ctx`."""
    import tritonclient.grpc as tc

    fut: Future[Any] = Future()

    def done(result: Any, error: Any) -> None:  # tritonclient passes both by keyword
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    inp = tc.InferInput("input", list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32")
    inp.set_data_from_numpy(x)
    fut.ctx = client.async_infer(model, [inp], callback=done, **kw)  # type: ignore[attr-defined]
    return fut


def metadata_properties(url: str, model: str) -> dict[str, str]:
    """The model metadata's properties, over raw gRPC with the guard's own protocol: properties
    (field 6) are in the published protocol, not in Triton's, so tritonclient drops them."""
    from guard._proto import grpc_predict_v2_pb2 as pb
    from guard._proto import grpc_predict_v2_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(url)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        md = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
    finally:
        channel.close()
    return dict(md.properties)
