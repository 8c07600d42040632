"""Malformed requests through a real channel: each gets its status code and a message naming
the problem, and the server keeps serving. Every GuardError kind reaches the client with its
code through the one interceptor. (A damaged artifact refused at startup: in
tests/test_reliability_artifacts.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from guard import errors
from tests.helpers import run_cli
from tests.serving import (
    ServerThread,
    gated_factory,
    infer_request,
    raw_stub,
    running,
    serve_config,
)

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
X = np.full((1, 3, 16, 16), 0.5, dtype=np.float32)


def _good(**fields: Any) -> Any:
    return infer_request(MODEL, X, **fields)


def _with(x: np.ndarray, datatype: str = "FP32") -> Any:
    return infer_request(MODEL, x, datatype)


def _shape(shape: list[int], nbytes: int | None = None) -> Any:
    req = _good()
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend(shape)
    req.raw_input_contents[0] = b"\0" * (nbytes if nbytes is not None else 4 * int(np.prod(shape)))
    return req


def _mutate(fn: Callable[[Any], None]) -> Any:
    req = _good()
    fn(req)
    return req


def _typed(field: str, values: list[Any], datatype: str = "FP32") -> Any:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype=datatype, shape=[1, 3, 16, 16])
    getattr(t.contents, field).extend(values)
    return req


def _nan() -> np.ndarray:
    x = X.copy()
    x[0, 1, 2, 3] = np.nan
    return x


def _inf() -> np.ndarray:
    x = X.copy()
    x[0, 0, 0, 0] = -np.inf
    return x


N = 3 * 16 * 16
# (case id, request, expected code, a fragment the message must contain)
MALFORMED: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
    ("unknown-model", lambda: infer_request("resnet", X), grpc.StatusCode.NOT_FOUND, "resnet"),
    ("unknown-version", lambda: _good(model_version="7"), grpc.StatusCode.NOT_FOUND, "'7'"),
    ("wrong-input-name", lambda: _mutate(lambda r: setattr(r.inputs[0], "name", "pixels")),
     INVALID, "pixels"),
    ("wrong-datatype", lambda: _with(X.astype(np.float64), "FP64"), INVALID, "FP64"),
    ("rank-3-shape", lambda: _shape([3, 16, 16]), INVALID, "shape"),
    ("wrong-image-size", lambda: _shape([1, 3, 8, 8]), INVALID, "[-1, 3, 16, 16]"),
    ("negative-dimension", lambda: _shape([-1, 3, 16, 16], 4 * N), INVALID, "negative"),
    ("empty-batch", lambda: _shape([0, 3, 16, 16]), INVALID, "empty batch"),
    ("batch-over-max", lambda: _shape([9, 3, 16, 16]), INVALID, "at most 8"),
    ("short-byte-length", lambda: _shape([1, 3, 16, 16], 4 * N - 4), INVALID, "bytes"),
    ("raw-and-typed-mixed",
     lambda: _mutate(lambda r: r.inputs[0].contents.fp32_contents.extend([0.5] * N)),
     INVALID, "raw_input_contents"),
    ("raw-count-mismatch", lambda: _mutate(lambda r: r.raw_input_contents.append(b"\0")),
     INVALID, "2 raw_input_contents"),
    ("nan", lambda: _with(_nan()), INVALID, "NaN"),
    ("inf", lambda: _with(_inf()), INVALID, "Inf"),
    ("out-of-range", lambda: _with(np.full((1, 3, 16, 16), 1.5, np.float32)), INVALID, "[0, 1]"),
    ("no-inputs", lambda: service_pb2.ModelInferRequest(model_name=MODEL), INVALID, "no inputs"),
    ("two-inputs", lambda: _mutate(lambda r: r.inputs.add(name="mask", datatype="FP32")),
     INVALID, "2 inputs"),
    ("no-data", lambda: _mutate(lambda r: r.ClearField("raw_input_contents")), INVALID, "no data"),
    ("typed-count", lambda: _typed("fp32_contents", [0.5] * (N - 1)), INVALID, "values"),
    ("typed-wrong-field", lambda: _typed("int64_contents", [0] * N), INVALID, "int64_contents"),
    ("uint8-typed-over-255", lambda: _typed("uint_contents", [300] * N, "UINT8"), INVALID, "255"),
    ("unknown-output", lambda: _mutate(lambda r: r.outputs.add(name="probabilities")),
     INVALID, "probabilities"),
    ("output-twice", lambda: _mutate(lambda r: (r.outputs.add(name="label"),
                                                r.outputs.add(name="label"))),
     INVALID, "twice"),
]  # fmt: skip


def _code_and_message(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


@pytest.mark.parametrize(("request_fn", "code", "fragment"),
                         [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])  # fmt: skip
def test_malformed_request_gets_its_code_and_the_server_keeps_serving(
    server: ServerThread, stub: Any, request_fn: Callable[[], Any], code: grpc.StatusCode,
    fragment: str,
) -> None:  # fmt: skip
    got, message = _code_and_message(lambda: stub.ModelInfer(request_fn(), timeout=30))
    assert got == code, message
    assert fragment in message
    ok = stub.ModelInfer(_good(), timeout=30)
    assert ok.outputs[0].name == "label"
    assert len(ok.raw_output_contents) == len(ok.outputs)


def test_typed_fp32_contents_are_accepted(stub: Any) -> None:
    res = stub.ModelInfer(_typed("fp32_contents", [0.5] * N), timeout=30)
    raw = stub.ModelInfer(_good(), timeout=30)
    assert res.raw_output_contents == raw.raw_output_contents


def test_model_rpcs_answer_not_found_for_another_model(stub: Any) -> None:
    for call in (
        lambda: stub.ModelReady(service_pb2.ModelReadyRequest(name="x"), timeout=10),
        lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="x"), timeout=10),
    ):
        assert _code_and_message(call)[0] == grpc.StatusCode.NOT_FOUND


def _error_kinds() -> list[type[errors.GuardError]]:
    return sorted(errors.GuardError.__subclasses__(), key=lambda c: c.__name__)


@pytest.mark.parametrize("kind", _error_kinds(), ids=lambda k: k.__name__)
def test_every_error_kind_reaches_the_client_with_its_code(
    artifact_dir: Path, kind: type[errors.GuardError]
) -> None:
    factory, engines = gated_factory()
    with running(serve_config(artifact_dir), factory) as srv:
        engines[0].fail_with = kind(f"{kind.__name__} raised inside the batch")
        channel, stub = raw_stub(srv.url)
        code, message = _code_and_message(lambda: stub.ModelInfer(_good(), timeout=30))
        channel.close()
        assert srv.sample("guard_requests_total", method="ModelInfer", outcome="success",
                          code="OK") == 0  # fmt: skip
    assert code == kind.code
    assert message == f"{kind.__name__} raised inside the batch"


def test_an_unexpected_exception_is_internal_without_details(server: ServerThread) -> None:
    dp = server.server.dataplane
    original = dp.server_metadata

    def broken() -> Any:
        raise KeyError("secret internals")

    dp.server_metadata = broken  # type: ignore[method-assign]
    try:
        channel, stub = raw_stub(server.url)
        call = lambda: stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=10)  # noqa: E731
        code, message = _code_and_message(call)
        channel.close()
    finally:
        dp.server_metadata = original  # type: ignore[method-assign]
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "ServerMetadata" in message
    assert server.sample("guard_requests_total", method="ServerMetadata", outcome="error",
                         code="INTERNAL") == 1  # fmt: skip


def test_device_cuda_fails_fast_without_a_gpu(artifact_dir: Path) -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU is present: --device cuda would serve")
    code, _, err = run_cli(["serve", str(artifact_dir), "--device", "cuda", "--no-metrics"])
    assert code == 2 and "cuda" in err.lower()
