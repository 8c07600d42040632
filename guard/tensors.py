"""Plain request and response tensors of the Open Inference Protocol, their validation and
their conversion to and from numpy. No protobuf here: guard.servicer fills these dataclasses.

Every rejection is an InvalidInput whose message names the problem (input name, datatype, shape,
byte length, contents) and never echoes the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.artifact import InputSpec
from guard.errors import InvalidInput

# datatype -> (little-endian numpy dtype, the typed-contents field that carries it)
DATATYPES: dict[str, tuple[str, str]] = {
    "FP32": ("<f4", "fp32_contents"),
    "UINT8": ("u1", "uint_contents"),
    "INT64": ("<i8", "int64_contents"),
    "BOOL": ("?", "bool_contents"),
}


@dataclass(frozen=True)
class TensorIn:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # typed contents that were set, by field name (e.g. {"fp32_contents": [...]}); None: none
    contents: Mapping[str, Sequence[Any]] | None = None


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str
    id: str
    inputs: tuple[TensorIn, ...]
    raw_input_contents: tuple[bytes, ...] = ()
    outputs: tuple[str, ...] = ()  # requested output names; empty: all of them
    parameters: Mapping[str, Any] = field(default_factory=dict)
    time_remaining_s: float | None = None  # until the client's deadline; None: no deadline


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable


@dataclass(frozen=True)
class TensorOut:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes  # little-endian, row-major: what tritonclient's as_numpy reads


def output_specs(num_classes: int) -> tuple[TensorMeta, ...]:
    """The guard's outputs, in the order they are returned when a request names none."""
    return (
        TensorMeta("label", "INT64", (-1,)),
        TensorMeta("flagged", "BOOL", (-1,)),
        TensorMeta("p_value", "FP32", (-1,)),
        TensorMeta("statistic", "FP32", (-1,)),
        TensorMeta("original_label", "INT64", (-1,)),
        TensorMeta("bounded_label", "INT64", (-1,)),
        TensorMeta("logits", "FP32", (-1, num_classes)),
    )


def requested_outputs(requested: Sequence[str], specs: Sequence[TensorMeta]) -> list[TensorMeta]:
    if not requested:
        return list(specs)
    by_name = {s.name: s for s in specs}
    chosen = []
    for name in requested:
        if name not in by_name:
            raise InvalidInput(f"unknown output {name!r}; this model returns {sorted(by_name)}")
        if by_name[name] in chosen:
            raise InvalidInput(f"output {name!r} is requested twice")
        chosen.append(by_name[name])
    return chosen


def _check_shape(t: TensorIn, spec: InputSpec, max_batch_size: int) -> None:
    expected = "[-1, " + ", ".join(str(d) for d in spec.shape) + "]"
    shape = list(t.shape)
    if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
        raise InvalidInput(f"input {t.name!r} has shape {shape}; expected {expected}")
    if shape[0] == 0:
        raise InvalidInput(f"input {t.name!r} is an empty batch (shape {shape})")
    if shape[0] < 0:
        raise InvalidInput(f"input {t.name!r} has a negative batch size (shape {shape})")
    if shape[0] > max_batch_size:
        raise InvalidInput(
            f"input {t.name!r} carries a batch of {shape[0]}; this server takes at most "
            f"{max_batch_size} per request (--max-batch-size)"
        )


def _from_raw(t: TensorIn, raw: bytes) -> np.ndarray:
    dtype = np.dtype(DATATYPES[t.datatype][0])
    needed = math.prod(t.shape) * dtype.itemsize
    if len(raw) != needed:
        raise InvalidInput(
            f"input {t.name!r} holds {len(raw)} bytes; shape {list(t.shape)} of {t.datatype} "
            f"needs {needed}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(t.shape)


def _from_contents(t: TensorIn, contents: Mapping[str, Sequence[Any]]) -> np.ndarray:
    dtype_str, field_name = DATATYPES[t.datatype]
    others = sorted(k for k, v in contents.items() if k != field_name and len(v))
    if others:
        raise InvalidInput(
            f"input {t.name!r} of {t.datatype} carries typed contents in {others}; "
            f"expected {field_name}"
        )
    values = contents.get(field_name, ())
    count = math.prod(t.shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {t.name!r} has {len(values)} values in {field_name}; shape "
            f"{list(t.shape)} needs {count}"
        )
    if t.datatype == "UINT8":
        wide = np.asarray(values, dtype=np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 255):
            raise InvalidInput(f"input {t.name!r} of UINT8 has values outside 0..255")
        return wide.astype(np.uint8).reshape(t.shape)
    return np.asarray(values, dtype=np.dtype(dtype_str)).reshape(t.shape)


def _check_values(name: str, x: np.ndarray, spec: InputSpec) -> None:
    if x.dtype != np.float32:
        return  # UINT8 pixels are in range by construction
    if not np.isfinite(x).all():
        raise InvalidInput(f"input {name!r} contains NaN or Inf")
    lo, hi = spec.value_range
    if x.min() < lo or x.max() > hi:
        raise InvalidInput(f"input {name!r} has FP32 values outside [{lo:g}, {hi:g}]")


def decode_input(request: InferRequest, spec: InputSpec, max_batch_size: int) -> np.ndarray:
    """The one image batch of the request, validated, as received: FP32 or UINT8 [N, C, H, W]."""
    if not request.inputs:
        raise InvalidInput(f"the request has no inputs; expected one input named {spec.name!r}")
    if len(request.inputs) > 1:
        names = [t.name for t in request.inputs]
        raise InvalidInput(f"the request has {len(names)} inputs {names}; expected {spec.name!r}")
    t = request.inputs[0]
    if t.name != spec.name:
        raise InvalidInput(f"unknown input {t.name!r}; this model's input is {spec.name!r}")
    allowed = ["FP32", "UINT8"] if spec.accepts_uint8 else ["FP32"]
    if t.datatype not in allowed:
        raise InvalidInput(
            f"input {t.name!r} has datatype {t.datatype!r}; expected {' or '.join(allowed)}"
        )
    _check_shape(t, spec, max_batch_size)
    raw = request.raw_input_contents
    if raw and t.contents is not None:
        raise InvalidInput(
            f"input {t.name!r} has typed contents while the request also carries "
            "raw_input_contents; use one or the other"
        )
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidInput(
                f"the request has {len(raw)} raw_input_contents entries for "
                f"{len(request.inputs)} input(s)"
            )
        x = _from_raw(t, raw[0])
    elif t.contents is not None:
        x = _from_contents(t, t.contents)
    else:
        raise InvalidInput(f"input {t.name!r} carries no data (neither raw nor typed contents)")
    _check_values(t.name, x, spec)
    return x


def to_pixels(x: np.ndarray) -> np.ndarray:
    """FP32 pixels in [0, 1] for the networks: UINT8 0..255 is scaled by 1/255."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def encode_output(meta: TensorMeta, values: np.ndarray) -> TensorOut:
    """Raw little-endian bytes of `values` in the output's datatype."""
    arr = np.ascontiguousarray(values, dtype=np.dtype(DATATYPES[meta.datatype][0]))
    return TensorOut(meta.name, meta.datatype, tuple(int(d) for d in arr.shape), arr.tobytes())
