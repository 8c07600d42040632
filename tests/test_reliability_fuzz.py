"""Hostile input (reliability): property-based fuzzing of ModelInfer through a real channel over
model names and versions, ids, inputs (names, datatypes, shapes), raw byte lengths and contents,
typed contents, parameters and output selections. Only OK, INVALID_ARGUMENT or NOT_FOUND may
come back (never INTERNAL, never a crash or a hang), an OK answer is well formed, and a valid
request right after every example still gets the right answer. Extreme but valid inputs (all
zeros, all ones, the value range's ends, the largest allowed batch) get exactly what in-process
inference answers.

The examples are derandomized (the same in every CI run); MMGUARD_FUZZ_EXAMPLES sets how many.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from benchmarks.reliability import Answer, answers
from guard.tensors import output_specs
from tests.conftest import Samples
from tests.serving import ServerThread, infer_request

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # the artifact is calibrated with torch
MODEL = "tiny"
MAX_BATCH = 8  # tests.serving.serve_config's
IMAGE = (3, 16, 16)
OUTPUTS = [s.name for s in output_specs(4)]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
NUMPY = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8", "BOOL": "?"}
ITEMSIZE = {"FP32": 4, "UINT8": 1, "INT64": 8, "BOOL": 1, "FP64": 8, "FP16": 2, "BF16": 2,
            "INT8": 1, "INT16": 2, "INT32": 4, "UINT16": 2, "UINT32": 4, "UINT64": 8}  # fmt: skip
FUZZ = settings(
    max_examples=int(os.environ.get("MMGUARD_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------------------------
# strategies: each field is what the server expects nine times in ten and something else the
# tenth, so that most requests are wrong in a field or two and reach the checks after the first


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten, `bad` the tenth."""
    return st.integers(0, 9).flatmap(lambda k: bad if k == 0 else good)


small_text = st.text(max_size=12)
model_names = mostly(st.just(MODEL), st.one_of(st.sampled_from(["", "Tiny", "tiny "]), small_text))
versions = mostly(st.sampled_from(["", "1"]), st.one_of(st.sampled_from(["2", "01"]), small_text))
input_names = mostly(
    st.just("input"), st.one_of(st.sampled_from(["", "INPUT", "input\0"]), small_text)
)
datatypes = mostly(
    st.sampled_from(["FP32", "UINT8"]),
    st.one_of(
        st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["", "fp32", "BYTES"]), small_text
    ),
)
shapes = mostly(
    st.builds(lambda b: [b, *IMAGE], st.integers(1, MAX_BATCH)),
    st.one_of(
        st.builds(lambda b: [b, *IMAGE], st.integers(-(2**63), 2**63 - 1)),
        st.lists(st.integers(-3, 20), max_size=6),
        st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=5),
    ),
)
parameter_values = st.one_of(
    st.builds(lambda v: service_pb2.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: service_pb2.InferParameter(int64_param=v),
              st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: service_pb2.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: service_pb2.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: service_pb2.InferParameter(string_param=v), st.text(max_size=20)),
    st.just(service_pb2.InferParameter()),  # no value set at all
)  # fmt: skip
parameters = st.dictionaries(small_text, parameter_values, max_size=3)
output_names = mostly(
    st.sampled_from(OUTPUTS),
    st.one_of(st.sampled_from(["", "LABEL", "probabilities", "label "]), small_text),
)
TYPED = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=4),
}


def _count(shape: list[int]) -> int | None:
    """Elements of a shape, if it is one a message can carry (else None)."""
    if any(d < 0 for d in shape):
        return None
    n = math.prod(shape)
    return n if n <= MAX_BATCH * math.prod(IMAGE) else None


@st.composite
def _payload(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Raw bytes: mostly the exact length for the shape with pixels in range; else all zeros,
    noise (NaN, Inf, out of range as FP32), a length off by a little, or anything."""
    count = _count(shape)
    if count is None:
        return bytes(draw(st.binary(max_size=4096)))
    itemsize = ITEMSIZE.get(datatype, 4)
    kind = draw(mostly(st.just("pixels"), st.sampled_from(["zeros", "noise", "off", "any"])))
    if kind == "any":
        return bytes(draw(st.binary(max_size=4096)))
    if kind == "off":
        return b"\0" * max(0, count * itemsize + draw(st.sampled_from([-8, -4, -1, 1, 4])))
    if kind == "noise":
        return bytes(draw(st.binary(min_size=count * itemsize, max_size=count * itemsize)))
    if kind == "zeros":
        return b"\0" * (count * itemsize)
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).random(count, dtype=np.float32)
    if datatype == "UINT8":
        return (pixels * 255).astype(np.uint8).tobytes()
    return pixels.astype(NUMPY.get(datatype, "<f4")).tobytes()


@st.composite
def infer_requests(draw: st.DrawFn) -> Any:
    """A ModelInferRequest, most of it as the server expects (see `mostly`)."""
    req = service_pb2.ModelInferRequest(
        model_name=draw(model_names), model_version=draw(versions), id=draw(small_text)
    )
    for key, value in draw(parameters).items():
        req.parameters[key].CopyFrom(value)
    for _ in range(draw(mostly(st.just(1), st.sampled_from([0, 2, 3])))):
        tensor = req.inputs.add(name=draw(input_names), datatype=draw(datatypes),
                                shape=draw(shapes))  # fmt: skip
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
        if draw(mostly(st.just(False), st.just(True))):  # typed contents, now and then
            field = draw(st.sampled_from(sorted(TYPED)))
            count = _count(list(tensor.shape))
            size = draw(st.sampled_from([count, 0, 1, 7]) if count else st.integers(0, 7))
            getattr(tensor.contents, field).extend(
                draw(st.lists(TYPED[field], min_size=size, max_size=size))
            )
    if req.inputs and draw(mostly(st.just(True), st.just(False))):  # raw contents, mostly
        first = req.inputs[0]
        req.raw_input_contents.append(draw(_payload(first.datatype, list(first.shape))))
        for _ in range(draw(mostly(st.just(0), st.sampled_from([1, 2])))):
            req.raw_input_contents.append(draw(st.binary(max_size=64)))
    outputs = mostly(
        st.lists(st.sampled_from(OUTPUTS), unique=True),  # a subset, in any order
        st.lists(output_names, max_size=len(OUTPUTS) + 2),  # names unknown or twice
    )
    for name in draw(outputs):
        out = req.outputs.add(name=name)
        for key, value in draw(parameters).items():
            out.parameters[key].CopyFrom(value)
    return req


# ---------------------------------------------------------------------------------------------
# the server, and what a good answer looks like


def decode(response: Any) -> dict[str, np.ndarray]:
    """A ModelInferResponse's outputs as arrays, checking each one's byte length."""
    assert len(response.raw_output_contents) == len(response.outputs)
    out = {}
    for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = np.dtype(NUMPY[meta.datatype])
        assert len(raw) == math.prod(meta.shape) * dtype.itemsize, meta.name
        out[meta.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(meta.shape))
    return out


def _check_answer(req: Any, response: Any) -> None:
    """An OK answer: the request's id, the outputs asked for (all, in order, if none), one value
    per input of the batch."""
    assert response.id == req.id
    asked = [o.name for o in req.outputs] or OUTPUTS
    assert [o.name for o in response.outputs] == asked
    batch = req.inputs[0].shape[0]
    for name, values in decode(response).items():
        assert values.shape == ((batch, 4) if name == "logits" else (batch,)), name


def _assert_still_serving(stub: Any, samples: Samples, engine: Any) -> None:
    x = samples.triggered[:1]
    result = decode(stub.ModelInfer(infer_request(MODEL, x), timeout=30))
    want = answers(engine, x)
    assert result["label"].tolist() == want.label.tolist()
    assert result["flagged"].tolist() == [True]


@FUZZ
@given(req=infer_requests())
def test_fuzzed_model_infer_gets_ok_invalid_argument_or_not_found_and_serving_goes_on(
    server: ServerThread, stub: Any, samples: Samples, engine: Any, req: Any
) -> None:
    try:
        response = stub.ModelInfer(req, timeout=30)
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ALLOWED, f"{code}: {exc.details()}"
        assert exc.details()  # a message naming the problem
    else:
        _check_answer(req, response)
    _assert_still_serving(stub, samples, engine)


@FUZZ
@given(
    datatype=st.sampled_from(["FP32", "UINT8"]),
    batch=st.integers(1, MAX_BATCH),
    seed=st.integers(0, 2**32 - 1),
    request_id=st.text(max_size=40),
    request_parameters=parameters,
    outputs=st.lists(st.sampled_from(OUTPUTS), unique=True, max_size=len(OUTPUTS)),
)
def test_fuzzed_valid_requests_get_their_outputs_and_the_right_answer(
    stub: Any, engine: Any, datatype: str, batch: int, seed: int, request_id: str,
    request_parameters: dict[str, Any], outputs: list[str],
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    if datatype == "UINT8":
        x: np.ndarray = rng.integers(0, 256, (batch, *IMAGE), dtype=np.uint8)
    else:
        x = rng.random((batch, *IMAGE), dtype=np.float32)
    req = infer_request(MODEL, x, datatype, id=request_id)
    for key, value in request_parameters.items():
        req.parameters[key].CopyFrom(value)
    for name in outputs:
        req.outputs.add(name=name)
    response = stub.ModelInfer(req, timeout=30)
    _check_answer(req, response)
    _assert_matches(decode(response), answers(engine, x))
    assert response.parameters["guard_mode"].string_param == "enforce"


@FUZZ
@given(name=model_names, version=versions)
def test_fuzzed_model_names_and_versions_get_ok_or_not_found(
    stub: Any, name: str, version: str
) -> None:
    served = name == MODEL and version in ("", "1")
    for call, request in (
        (stub.ModelReady, service_pb2.ModelReadyRequest(name=name, version=version)),
        (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name, version=version)),
    ):
        if served:
            assert call(request, timeout=10)
            continue
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_fuzzed_request_was_counted_as_a_server_error(server: ServerThread) -> None:
    """Runs after the fuzzing above (same module server): the interceptor never mapped anything
    to INTERNAL or UNKNOWN."""
    for code in ("INTERNAL", "UNKNOWN"):
        assert server.sample("guard_requests_total", method="ModelInfer", outcome="error",
                             code=code) == 0  # fmt: skip
    assert server.sample("guard_requests_total", method="ModelInfer", outcome="success",
                         code="OK") > 0  # fmt: skip


# ---------------------------------------------------------------------------------------------
# extreme but valid inputs


def _assert_matches(got: dict[str, np.ndarray], want: Answer) -> None:
    for name in ("label", "flagged", "original_label", "bounded_label"):
        if name in got:
            assert got[name].tolist() == getattr(want, name).tolist(), name
    if "statistic" in got:
        np.testing.assert_allclose(got["statistic"], want.statistic, rtol=1e-5, atol=1e-5)


def _extremes(samples: Samples) -> dict[str, np.ndarray]:
    ones = np.ones((1, *IMAGE), dtype=np.float32)
    checker = (np.indices(IMAGE).sum(axis=0) % 2).astype(np.float32)[None]
    mixed = np.concatenate([samples.triggered, samples.clean])[:MAX_BATCH]
    return {
        "zeros": np.zeros_like(ones),
        "ones": ones,
        "negative-zero": np.full_like(ones, -0.0),
        "smallest-subnormal": np.full_like(ones, np.nextafter(np.float32(0), np.float32(1))),
        "largest-below-one": np.full_like(ones, np.nextafter(np.float32(1), np.float32(0))),
        "checkerboard-0-1": checker,
        "uint8-zeros": np.zeros((1, *IMAGE), dtype=np.uint8),
        "uint8-255": np.full((1, *IMAGE), 255, dtype=np.uint8),
        "largest-batch-zeros": np.zeros((MAX_BATCH, *IMAGE), dtype=np.float32),
        "largest-batch-ones-uint8": np.full((MAX_BATCH, *IMAGE), 255, dtype=np.uint8),
        "largest-batch-mixed": mixed,
        "largest-batch-mixed-uint8": np.round(mixed * 255).astype(np.uint8),
    }


EXTREMES = [
    "zeros", "ones", "negative-zero", "smallest-subnormal", "largest-below-one",
    "checkerboard-0-1", "uint8-zeros", "uint8-255", "largest-batch-zeros",
    "largest-batch-ones-uint8", "largest-batch-mixed", "largest-batch-mixed-uint8",
]  # fmt: skip


@pytest.mark.parametrize("case", EXTREMES)
def test_extreme_but_valid_inputs_answer_what_in_process_inference_answers(
    stub: Any, samples: Samples, engine: Any, case: str
) -> None:
    x = _extremes(samples)[case]
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    got = decode(stub.ModelInfer(infer_request(MODEL, x, datatype), timeout=30))
    assert got["label"].shape == (len(x),)
    _assert_matches(got, answers(engine, x))
    if case == "largest-batch-mixed":
        assert got["flagged"].tolist() == [True] * 4 + [False] * 4


def test_the_largest_batch_as_typed_contents_answers_the_same(stub: Any, samples: Samples) -> None:
    x = np.concatenate([samples.triggered, samples.clean])[:MAX_BATCH]
    typed = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    raw = stub.ModelInfer(infer_request(MODEL, x), timeout=30)
    assert stub.ModelInfer(typed, timeout=30).raw_output_contents == raw.raw_output_contents
