"""Plain tensors: validation and decoding of the input, encoding of the outputs, the guarded
outputs in enforce and shadow mode, splitting a batch's result per request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard.artifact import InputSpec
from guard.dataplane import Scored, guarded_outputs, split_scored
from guard.errors import InvalidInput
from guard.mmdf import Decisions
from guard.tensors import (
    InferRequest,
    TensorIn,
    TensorMeta,
    decode_input,
    encode_output,
    output_specs,
    requested_outputs,
    to_pixels,
)

SPEC = InputSpec("input", (3, 2, 2), "FP32", (0.0, 1.0), accepts_uint8=True)
FP32_ONLY = InputSpec("input", (3, 2, 2), "FP32", (0.0, 1.0), accepts_uint8=False)


def _raw(x: np.ndarray, datatype: str = "FP32", name: str = "input") -> InferRequest:
    t = TensorIn(name, datatype, tuple(x.shape))
    return InferRequest("m", "", "", (t,), (x.tobytes(),))


def _typed(values: list[Any], field: str, datatype: str, shape: tuple[int, ...]) -> InferRequest:
    return InferRequest("m", "", "", (TensorIn("input", datatype, shape, {field: values}),))


def test_raw_fp32_is_decoded_little_endian_row_major() -> None:
    x = np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 2, 2)
    out = decode_input(_raw(x.astype("<f4")), SPEC, max_batch_size=4)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.float32


def test_uint8_is_accepted_only_when_the_manifest_allows_and_scaled_by_1_over_255() -> None:
    u = np.array([0, 51, 255] * 4, dtype=np.uint8).reshape(1, 3, 2, 2)
    out = decode_input(_raw(u, "UINT8"), SPEC, max_batch_size=4)
    assert out.dtype == np.uint8
    np.testing.assert_allclose(to_pixels(out).ravel()[:3], [0.0, 0.2, 1.0], rtol=1e-6)
    with pytest.raises(InvalidInput, match=r"expected FP32$"):
        decode_input(_raw(u, "UINT8"), FP32_ONLY, max_batch_size=4)


def test_typed_contents_are_decoded() -> None:
    out = decode_input(_typed([0.25] * 12, "fp32_contents", "FP32", (1, 3, 2, 2)), SPEC, 4)
    assert out.shape == (1, 3, 2, 2) and float(out.max()) == 0.25
    out = decode_input(_typed([7] * 12, "uint_contents", "UINT8", (1, 3, 2, 2)), SPEC, 4)
    assert out.dtype == np.uint8 and int(out.max()) == 7


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (_raw(np.zeros((1, 3, 2, 2), np.float32), name="x"), "unknown input 'x'"),
        (_raw(np.zeros((1, 3, 2, 2), np.float64), "FP64"), "datatype 'FP64'"),
        (_raw(np.zeros((1, 2, 2, 3), np.float32)), "expected [-1, 3, 2, 2]"),
        (_raw(np.zeros((5, 3, 2, 2), np.float32)), "at most 4"),
        (_raw(np.zeros((0, 3, 2, 2), np.float32)), "empty batch"),
        (_raw(np.full((1, 3, 2, 2), -0.5, np.float32)), "outside [0, 1]"),
        (_typed([0.5] * 11, "fp32_contents", "FP32", (1, 3, 2, 2)), "11 values"),
        (_typed([1] * 12, "int_contents", "FP32", (1, 3, 2, 2)), "int_contents"),
        (_typed([256] * 12, "uint_contents", "UINT8", (1, 3, 2, 2)), "outside 0..255"),
        (InferRequest("m", "", "", ()), "no inputs"),
    ],
)
def test_invalid_inputs_name_the_problem(request_: InferRequest, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_input(request_, SPEC, max_batch_size=4)
    assert fragment in str(info.value)


def test_requested_outputs_keep_the_order_and_reject_unknown_or_repeated_names() -> None:
    specs = output_specs(3)
    assert [s.name for s in requested_outputs((), specs)] == [s.name for s in specs]
    assert [s.name for s in requested_outputs(("logits", "label"), specs)] == ["logits", "label"]
    with pytest.raises(InvalidInput, match="unknown output 'probs'"):
        requested_outputs(("probs",), specs)
    with pytest.raises(InvalidInput, match="twice"):
        requested_outputs(("label", "label"), specs)


def test_outputs_are_encoded_raw_in_their_datatype() -> None:
    out = encode_output(TensorMeta("flagged", "BOOL", (-1,)), np.array([True, False]))
    assert out.raw == b"\x01\x00" and out.shape == (2,)
    out = encode_output(TensorMeta("label", "INT64", (-1,)), np.array([1, 258]))
    assert out.raw == (1).to_bytes(8, "little") + (258).to_bytes(8, "little")
    out = encode_output(TensorMeta("p", "FP32", (-1,)), np.array([0.5]))
    assert np.frombuffer(out.raw, "<f4").tolist() == [0.5]


def _scored() -> Scored:
    d = Decisions(
        label=np.array([2, 1, 0]),
        flagged=np.array([True, False, False]),
        p_value=np.array([1e-6, 0.5, 0.3]),
        statistic=np.array([9.0, 0.1, 0.2]),
        original_label=np.array([0, 1, 0]),
        bounded_label=np.array([0, 1, 0]),
        logits=np.array([[0, 1, 2], [0, 3, 0], [4, 0, 0]], dtype=np.float32),
    )
    original = np.array([[5, 1, 2], [0, 3, 0], [4, 0, 0]], dtype=np.float32)
    return Scored(d, original)


def test_shadow_mode_returns_the_original_decision_and_logits() -> None:
    enforce = guarded_outputs(_scored(), shadow=False)
    shadow = guarded_outputs(_scored(), shadow=True)
    assert enforce["label"].tolist() == [2, 1, 0] and shadow["label"].tolist() == [0, 1, 0]
    assert enforce["logits"][0].tolist() == [0, 1, 2] and shadow["logits"][0].tolist() == [5, 1, 2]
    for name in ("flagged", "p_value", "statistic", "original_label", "bounded_label"):
        np.testing.assert_array_equal(enforce[name], shadow[name])
    assert enforce["p_value"].dtype == np.float32


def test_a_batch_result_splits_into_consecutive_parts() -> None:
    parts = split_scored(_scored(), [2, 1])
    assert [p.decisions.label.tolist() for p in parts] == [[2, 1], [0]]
    assert parts[1].original_logits.tolist() == [[4, 0, 0]]
