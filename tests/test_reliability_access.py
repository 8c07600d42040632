"""Access (reliability): with a bearer token configured, every RPC (the six of the inference
service and reflection) answers UNAUTHENTICATED to a call without the token or with a wrong one,
runs nothing for it and tells it nothing (not even whether the model exists); only the health
service is open, as Kubernetes probes need. With mutual TLS, a client without a certificate from
the configured CA (none, another CA's, or plaintext) cannot reach any RPC, health included."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from guard.config import TlsConfig
from tests.certs import Pem
from tests.conftest import Samples
from tests.serving import ServerThread, infer_request, running, serve_config

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # the artifact is calibrated with torch
MODEL = "tiny"
TOKEN = "s3cret-token"
X = np.full((1, 3, 16, 16), 0.5, dtype=np.float32)
Metadata = list[tuple[str, str]]
Call = Callable[[grpc.Channel, Metadata], Any]

# every RPC a client can make besides health, each a complete valid call
INFERENCE_RPCS: dict[str, Call] = {
    "ServerLive": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(
        service_pb2.ServerLiveRequest(), metadata=md, timeout=10),
    "ServerReady": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerReady(
        service_pb2.ServerReadyRequest(), metadata=md, timeout=10),
    "ModelReady": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelReady(
        service_pb2.ModelReadyRequest(name=MODEL), metadata=md, timeout=10),
    "ServerMetadata": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerMetadata(
        service_pb2.ServerMetadataRequest(), metadata=md, timeout=10),
    "ModelMetadata": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
        service_pb2.ModelMetadataRequest(name=MODEL), metadata=md, timeout=10),
    "ModelInfer": lambda ch, md: service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
        infer_request(MODEL, X), metadata=md, timeout=10),
}  # fmt: skip


def _reflection(channel: grpc.Channel, md: Metadata) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return list(stub.ServerReflectionInfo(iter([request]), metadata=md, timeout=10))


def _health(channel: grpc.Channel, md: Metadata) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), metadata=md, timeout=10)


ALL_RPCS: dict[str, Call] = {**INFERENCE_RPCS, "ServerReflectionInfo": _reflection}
GOOD: Metadata = [("authorization", f"Bearer {TOKEN}")]
BAD: dict[str, Metadata] = {
    "no-token": [],
    "wrong-token": [("authorization", "Bearer nope")],
    "token-plus-a-character": [("authorization", f"Bearer {TOKEN}x")],
    "token-less-a-character": [("authorization", f"Bearer {TOKEN[:-1]}")],
    "empty-bearer": [("authorization", "Bearer ")],
    "no-scheme": [("authorization", TOKEN)],
    "basic-scheme": [("authorization", f"Basic {TOKEN}")],
    "another-header": [("x-authorization", f"Bearer {TOKEN}")],
}


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


@pytest.fixture(scope="module")
def token_server(artifact_dir: Path) -> Iterator[ServerThread]:
    with running(serve_config(artifact_dir, auth_token=TOKEN)) as srv:
        yield srv


@pytest.fixture()
def channel(token_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(token_server.url) as ch:
        yield ch


@pytest.mark.parametrize("metadata", list(BAD.values()), ids=list(BAD))
def test_every_rpc_refuses_a_missing_or_wrong_token(
    token_server: ServerThread, channel: grpc.Channel, metadata: Metadata
) -> None:
    inferred = token_server.sample("guard_inferences_total")
    codes = {name: _code(lambda c=call: c(channel, metadata)) for name, call in ALL_RPCS.items()}  # type: ignore[misc]
    assert codes == dict.fromkeys(ALL_RPCS, grpc.StatusCode.UNAUTHENTICATED)
    assert token_server.sample("guard_inferences_total") == inferred  # nothing ran


def test_every_rpc_answers_with_the_token_and_health_needs_none(
    token_server: ServerThread, channel: grpc.Channel
) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert INFERENCE_RPCS["ServerLive"](channel, GOOD).live
    assert INFERENCE_RPCS["ServerReady"](channel, GOOD).ready
    assert INFERENCE_RPCS["ModelReady"](channel, GOOD).ready
    assert INFERENCE_RPCS["ServerMetadata"](channel, GOOD).name == "mmguard"
    assert INFERENCE_RPCS["ModelMetadata"](channel, GOOD).name == MODEL
    assert INFERENCE_RPCS["ModelInfer"](channel, GOOD).outputs[0].name == "label"
    services = _reflection(channel, GOOD)[0].list_services_response.service
    assert "inference.GRPCInferenceService" in {s.name for s in services}
    # the scheme is case-insensitive (RFC 7235), the token is not
    lower = [("authorization", f"bearer {TOKEN}")]
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=lower, timeout=10).live
    upper = [("authorization", f"Bearer {TOKEN.upper()}")]
    live = service_pb2.ServerLiveRequest()
    refused = _code(lambda: stub.ServerLive(live, metadata=upper, timeout=10))
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    assert _health(channel, []).status == health_pb2.HealthCheckResponse.SERVING


def test_an_unauthenticated_caller_learns_nothing_and_is_counted(
    token_server: ServerThread, channel: grpc.Channel, samples: Samples
) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    s = token_server.sample
    before = {m: s("guard_requests_total", method=m, outcome="unauthenticated",
                   code="UNAUTHENTICATED") for m in INFERENCE_RPCS}  # fmt: skip
    inferred = s("guard_inferences_total")
    probes = [  # each would be NOT_FOUND or INVALID_ARGUMENT with the token
        infer_request("no-such-model", X),
        infer_request(MODEL, X, model_version="7"),
        infer_request(MODEL, np.full((1, 3, 16, 16), np.nan, dtype=np.float32)),
    ]
    for req in probes:
        for md in BAD.values():
            assert _code(lambda r=req, m=md: stub.ModelInfer(r, metadata=m, timeout=10)) == (  # type: ignore[misc]
                grpc.StatusCode.UNAUTHENTICATED
            )
    for call in INFERENCE_RPCS.values():
        assert _code(lambda c=call: c(channel, [])) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[misc]
    after = {m: s("guard_requests_total", method=m, outcome="unauthenticated",
                  code="UNAUTHENTICATED") for m in INFERENCE_RPCS}  # fmt: skip
    expected = {m: 1 for m in INFERENCE_RPCS}
    expected["ModelInfer"] += len(probes) * len(BAD)
    assert {m: after[m] - before[m] for m in INFERENCE_RPCS} == expected
    assert s("guard_inferences_total") == inferred
    # stock tritonclient passes the token as a header and gets its answer
    client = tc.InferenceServerClient(token_server.url)
    x = tc.InferInput("input", list(samples.triggered[:1].shape), "FP32")
    x.set_data_from_numpy(samples.triggered[:1])
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [x], client_timeout=30)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    result = client.infer(MODEL, [x], headers={"authorization": f"Bearer {TOKEN}"},
                          client_timeout=30)  # fmt: skip
    assert result.as_numpy("flagged").tolist() == [True]
    client.close()


# ---------------------------------------------------------------------------------------------
# mutual TLS


def _credentials(pki: dict[str, Pem], client: str | None) -> grpc.ChannelCredentials:
    key = chain = None
    if client is not None:
        key, chain = pki[client].key.read_bytes(), pki[client].cert.read_bytes()
    return grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes(), key, chain)


def test_with_mutual_tls_a_client_without_a_certificate_from_the_ca_reaches_no_rpc(
    artifact_dir: Path, pki: dict[str, Pem], samples: Samples
) -> None:
    tls = TlsConfig(pki["server"].cert, pki["server"].key, client_ca_file=pki["ca"].cert)
    with running(serve_config(artifact_dir, tls=tls)) as srv:
        refused: dict[str, Callable[[], grpc.Channel]] = {
            "no-certificate": lambda: grpc.secure_channel(srv.url, _credentials(pki, None)),
            "another-ca": lambda: grpc.secure_channel(srv.url, _credentials(pki, "rogue_client")),
            "plaintext": lambda: grpc.insecure_channel(srv.url),
        }
        for who, make in refused.items():
            with make() as channel:
                for name, call in {**ALL_RPCS, "Health": _health}.items():
                    assert _code(lambda c=call, ch=channel: c(ch, [])) == (  # type: ignore[misc]
                        grpc.StatusCode.UNAVAILABLE
                    ), (who, name)
        with grpc.secure_channel(srv.url, _credentials(pki, "client")) as channel:
            for name, call in {**ALL_RPCS, "Health": _health}.items():
                assert call(channel, []), name
        # stock tritonclient with the client certificate
        good = tc.InferenceServerClient(
            srv.url, ssl=True, root_certificates=str(pki["ca"].cert),
            private_key=str(pki["client"].key), certificate_chain=str(pki["client"].cert),
        )  # fmt: skip
        x = tc.InferInput("input", [1, 3, 16, 16], "FP32")
        x.set_data_from_numpy(samples.clean[:1])
        assert good.infer(MODEL, [x], client_timeout=30).as_numpy("flagged").tolist() == [False]
        good.close()
        assert srv.sample("guard_inferences_total") == 2  # the two good ModelInfer calls
