"""A bare Open Inference Protocol server for benchmarks.serving: grpc.aio with the guard's own
generated service, answering every ModelInfer at once with a canned response of the guard's shape
(its seven outputs for one input), with no batching, no validation, no inference and no metrics.

It is the floor of what a Python gRPC server costs per request on this machine: the CPU it spends
per request, measured under the same client as the guard's server, is the part of the guard's
cost that no work inside the guard can remove.

    .venv/bin/python -m benchmarks.bare_server --classes 10

Like `mmguard serve`, it logs "listening on HOST:PORT" and answers the gRPC health check, so
guard.process.ServerProcess starts it, reads its port and waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guard._proto import grpc_predict_v2_pb2 as pb
from guard._proto import grpc_predict_v2_pb2_grpc as pb_grpc


def canned_response(model: str, classes: int) -> pb.ModelInferResponse:
    """The guard's answer to one input: label, flagged, p_value, statistic, original_label,
    bounded_label and logits, raw little-endian contents."""
    msg = pb.ModelInferResponse(model_name=model, model_version="1")
    outputs: list[tuple[str, str, list[int], np.ndarray]] = [
        ("label", "INT64", [1], np.zeros(1, np.int64)),
        ("flagged", "BOOL", [1], np.zeros(1, np.bool_)),
        ("p_value", "FP32", [1], np.full(1, 0.5, np.float32)),
        ("statistic", "FP32", [1], np.zeros(1, np.float32)),
        ("original_label", "INT64", [1], np.zeros(1, np.int64)),
        ("bounded_label", "INT64", [1], np.zeros(1, np.int64)),
        ("logits", "FP32", [1, classes], np.zeros((1, classes), np.float32)),
    ]
    for name, datatype, shape, value in outputs:
        msg.outputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_output_contents.append(value.tobytes())
    msg.parameters["guard_mode"].string_param = "bare"
    return msg


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, response: pb.ModelInferResponse) -> None:
        self._response = response

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return self._response


async def serve(host: str, port: int, model: str, classes: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        BareServicer(canned_response(model, classes)), server
    )
    checks = health.aio.HealthServicer()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="bare")
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.model, args.classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
