"""The gRPC transport of the Open Inference Protocol: protobuf in, plain dataclasses to the
DataPlane, protobuf out. Errors are raised, not set on the context: StatusInterceptor maps them.
"""

from __future__ import annotations

from typing import Any

import grpc

from guard._proto import grpc_predict_v2_pb2 as pb
from guard._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from guard.dataplane import DataPlane, InferResponse
from guard.tensors import InferRequest, TensorIn, TensorMeta

SERVICE_NAME = "inference.GRPCInferenceService"
_PARAMETER_FIELDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


def _parameters(params: Any) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind in _PARAMETER_FIELDS else None
    return out


def _tensor_in(t: pb.ModelInferRequest.InferInputTensor) -> TensorIn:
    contents = None
    if t.HasField("contents"):
        contents = {f.name: values for f, values in t.contents.ListFields()}
    return TensorIn(t.name, t.datatype, tuple(t.shape), contents)


def to_infer_request(msg: pb.ModelInferRequest, time_remaining_s: float | None) -> InferRequest:
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        inputs=tuple(_tensor_in(t) for t in msg.inputs),
        raw_input_contents=tuple(msg.raw_input_contents),
        outputs=tuple(o.name for o in msg.outputs),
        parameters=_parameters(msg.parameters),
        time_remaining_s=time_remaining_s,
    )


def _set_parameter(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def to_infer_response(res: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=res.model_name, model_version=res.model_version)
    msg.id = res.id
    for key, value in res.parameters.items():
        _set_parameter(msg.parameters[key], value)
    for out in res.outputs:
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        msg.raw_output_contents.append(out.raw)  # raw only: tritonclient reads nothing else
    return msg


def _tensor_meta(t: TensorMeta) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._dp.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name, version, extensions = self._dp.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self._dp.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=m.versions,
            platform=m.platform,
            inputs=[_tensor_meta(t) for t in m.inputs],
            outputs=[_tensor_meta(t) for t in m.outputs],
            properties=m.properties,
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        plain = to_infer_request(request, context.time_remaining())
        return to_infer_response(await self._dp.infer(plain))
