"""TLS through real channels with stock tritonclient. Mutual TLS and the bearer token are in
tests/test_reliability_access.py (on every RPC)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from guard.config import TlsConfig
from tests.certs import Pem
from tests.conftest import Samples
from tests.serving import ServerThread, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"


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
