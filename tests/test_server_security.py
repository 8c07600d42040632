"""TLS, mutual TLS and the bearer token, through real channels with stock tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from guard.config import TlsConfig
from tests.certs import CertificateAuthority, Pem
from tests.conftest import Samples
from tests.serving import ServerThread, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root, "guard-ca")
    rogue = CertificateAuthority(root, "rogue-ca")
    return {
        "ca": ca.pem,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
    }


def _infer(client: tc.InferenceServerClient, x: np.ndarray, **kw: object) -> tc.InferResult:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL, [inp], client_timeout=30, **kw)  # type: ignore[arg-type]


def _status(fn: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn()  # type: ignore[operator]
    return str(info.value.status())


def _tls_client(url: str, pki: dict[str, Pem], client: str | None) -> tc.InferenceServerClient:
    kw = {}
    if client is not None:
        kw = {"private_key": str(pki[client].key), "certificate_chain": str(pki[client].cert)}
    return tc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"].cert), **kw)


@pytest.fixture()
def tls_server(artifact_dir: Path, pki: dict[str, Pem]) -> Iterator[ServerThread]:
    tls = TlsConfig(pki["server"].cert, pki["server"].key)
    with running(serve_config(artifact_dir, tls=tls)) as srv:
        yield srv


def test_tls_serves_clients_that_trust_the_ca(
    tls_server: ServerThread, pki: dict[str, Pem], samples: Samples
) -> None:
    client = _tls_client(tls_server.url, pki, None)
    assert client.is_server_ready()
    assert _infer(client, samples.triggered[:1]).as_numpy("flagged").tolist() == [True]
    client.close()
    plain = tc.InferenceServerClient(tls_server.url)
    assert _status(lambda: plain.is_server_live(client_timeout=5)) in (
        "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
    )  # fmt: skip
    plain.close()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    artifact_dir: Path, pki: dict[str, Pem], samples: Samples
) -> None:
    tls = TlsConfig(pki["server"].cert, pki["server"].key, client_ca_file=pki["ca"].cert)
    with running(serve_config(artifact_dir, tls=tls)) as srv:
        good = _tls_client(srv.url, pki, "client")
        assert _infer(good, samples.clean[:1]).as_numpy("flagged").tolist() == [False]
        good.close()
        for who in (None, "rogue_client"):
            bad = _tls_client(srv.url, pki, who)
            assert _status(lambda b=bad: b.is_server_live(client_timeout=5)) in (  # type: ignore[misc]
                "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
            ), who  # fmt: skip
            bad.close()


def test_the_bearer_token_is_required_except_for_health(
    artifact_dir: Path, samples: Samples
) -> None:
    with running(serve_config(artifact_dir, auth_token=TOKEN)) as srv:
        client = tc.InferenceServerClient(srv.url)
        x = samples.clean[:1]
        assert _status(lambda: _infer(client, x)) == "StatusCode.UNAUTHENTICATED"
        wrong = {"authorization": "Bearer nope"}
        assert _status(lambda: _infer(client, x, headers=wrong)) == "StatusCode.UNAUTHENTICATED"
        assert _status(lambda: client.is_server_ready()) == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_ready(headers=good)
        assert _infer(client, x, headers=good).as_numpy("label").shape == (1,)
        client.close()
        with grpc.insecure_channel(srv.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            res = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
            _reflection_needs_the_token(channel)
        unauthenticated = srv.sample("guard_requests_total", method="ModelInfer",
                                     outcome="unauthenticated", code="UNAUTHENTICATED")  # fmt: skip
        assert unauthenticated == 2


def _reflection_needs_the_token(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
