"""The real server on port 0 driven by stock tritonclient, against an artifact made by
`mmguard calibrate`: every RPC, the guarded decision, output subsets, shadow mode, reflection."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc._utils import (
    TRITON_RESERVED_REQUEST_PARAMS,
    TRITON_RESERVED_REQUEST_PARAMS_PREFIX,
)

from guard.tensors import output_specs
from tests.conftest import ATTACK_TARGET, Samples
from tests.serving import ServerThread, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"
ALL_OUTPUTS = [s.name for s in output_specs(4)]


@pytest.fixture()
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.url)
    yield c
    c.close()


def infer(
    client: tc.InferenceServerClient, x: np.ndarray, outputs: list[str] | None = None, **kw: object
) -> tc.InferResult:
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    requested = None if outputs is None else [tc.InferRequestedOutput(n) for n in outputs]
    return client.infer(MODEL, [inp], outputs=requested, client_timeout=30, **kw)  # type: ignore[arg-type]


def test_liveness_readiness_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    server_md = client.get_server_metadata()
    assert server_md.name == "mmguard" and server_md.version
    md = client.get_model_metadata(MODEL)
    assert md.name == MODEL and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
        ("input", "FP32", [-1, 3, 16, 16])
    ]
    assert [t.name for t in md.outputs] == ALL_OUTPUTS
    assert [list(t.shape) for t in md.outputs][-1] == [-1, 4]
    as_json = client.get_model_metadata(MODEL, as_json=True)
    assert as_json["platform"] == "onnxruntime_onnx"


def test_triggered_inputs_are_flagged_and_corrected(
    client: tc.InferenceServerClient, samples: Samples
) -> None:
    res = infer(client, samples.triggered)
    assert res.as_numpy("flagged").tolist() == [True] * 4
    label = res.as_numpy("label")
    assert label.dtype == np.int64 and not np.any(label == ATTACK_TARGET)
    assert res.as_numpy("original_label").tolist() == [ATTACK_TARGET] * 4
    p = res.as_numpy("p_value")
    assert p.dtype == np.float32 and np.all(p < 0.005)
    assert np.all(res.as_numpy("statistic") > 0)
    assert res.as_numpy("bounded_label").shape == (4,)
    assert res.as_numpy("logits").shape == (4, 4)


def test_clean_inputs_pass_with_their_original_label(
    client: tc.InferenceServerClient, samples: Samples
) -> None:
    res = infer(client, samples.clean)
    assert res.as_numpy("flagged").tolist() == [False] * 4
    assert res.as_numpy("label").tolist() == samples.clean_labels.tolist()
    assert res.as_numpy("original_label").tolist() == samples.clean_labels.tolist()
    assert np.all(res.as_numpy("p_value") >= 0.005)
    assert np.argmax(res.as_numpy("logits"), axis=1).tolist() == samples.clean_labels.tolist()


def test_uint8_pixels_give_the_fp32_answer(
    client: tc.InferenceServerClient, samples: Samples
) -> None:
    a = infer(client, samples.triggered_u8)
    b = infer(client, samples.triggered)
    for name in ALL_OUTPUTS:
        np.testing.assert_allclose(a.as_numpy(name), b.as_numpy(name), rtol=1e-5, atol=1e-5)


def test_a_subset_of_outputs_in_the_requested_order(
    client: tc.InferenceServerClient, samples: Samples
) -> None:
    res = infer(client, samples.clean[:2], outputs=["p_value", "label"])
    assert [o.name for o in res.get_response().outputs] == ["p_value", "label"]
    assert res.as_numpy("label").shape == (2,)
    assert res.as_numpy("flagged") is None


def test_request_id_is_echoed_and_parameters_are_not_reserved(
    client: tc.InferenceServerClient, samples: Samples
) -> None:
    # tritonclient's own request parameters (priority, timeout) are accepted and ignored
    res = infer(client, samples.clean[:1], request_id="req-42", priority=1, timeout=10_000_000)
    response = res.get_response()
    assert response.id == "req-42"
    params = dict(response.parameters)
    assert params["guard_mode"].string_param == "enforce"
    assert params["guard_request_id"].string_param == "req-42"
    for name in params:
        assert name not in TRITON_RESERVED_REQUEST_PARAMS
        assert not name.startswith(TRITON_RESERVED_REQUEST_PARAMS_PREFIX)


def test_shadow_mode_answers_the_original_label_but_flags_and_counts(
    artifact_dir: Path, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    with running(serve_config(artifact_dir, mode="shadow")) as srv:
        client = tc.InferenceServerClient(srv.url)
        with caplog.at_level(logging.WARNING, logger="guard.flagged"):
            res = infer(client, samples.triggered)
        client.close()
        assert res.as_numpy("label").tolist() == [ATTACK_TARGET] * 4
        assert res.as_numpy("flagged").tolist() == [True] * 4
        assert not np.any(res.as_numpy("bounded_label") == -1)
        assert dict(res.get_response().parameters)["guard_mode"].string_param == "shadow"
        assert srv.sample("guard_flagged_total") == 4
    flagged = [r for r in caplog.records if r.name == "guard.flagged"]
    assert len(flagged) == 4 and all(r.fields["mode"] == "shadow" for r in flagged)  # type: ignore[attr-defined]


def test_unguarded_mode_answers_the_original_label_and_never_flags(
    artifact_dir: Path, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="guard"),
        running(serve_config(artifact_dir, mode="unguarded")) as srv,
    ):
        client = tc.InferenceServerClient(srv.url)
        res = infer(client, samples.triggered)  # inputs enforce mode flags and corrects
        client.close()
        assert res.as_numpy("label").tolist() == [ATTACK_TARGET] * 4
        assert res.as_numpy("original_label").tolist() == [ATTACK_TARGET] * 4
        assert res.as_numpy("bounded_label").tolist() == [ATTACK_TARGET] * 4
        assert res.as_numpy("flagged").tolist() == [False] * 4
        assert np.all(np.isnan(res.as_numpy("p_value")))
        assert res.as_numpy("statistic").tolist() == [0.0] * 4
        assert np.argmax(res.as_numpy("logits"), axis=1).tolist() == [ATTACK_TARGET] * 4
        assert dict(res.get_response().parameters)["guard_mode"].string_param == "unguarded"
        assert srv.sample("guard_flagged_total") == 0
        assert srv.sample("guard_inferences_total") == 4
        assert srv.sample("guard_p_value_count") == 0
        info = next(m for m in srv.registry.collect() if m.name == "guard_build_info")
        assert info.samples[0].labels["mode"] == "unguarded"
    warned = [r.getMessage() for r in caplog.records if r.name == "guard.server"]
    assert any("NO backdoor protection" in m for m in warned), warned
    assert not [r for r in caplog.records if r.name == "guard.flagged"]


def test_alpha_override_changes_the_decision(artifact_dir: Path, samples: Samples) -> None:
    # with alpha at 1e-300 nothing reaches significance: the triggered inputs pass
    with running(serve_config(artifact_dir, alpha=1e-300)) as srv:
        client = tc.InferenceServerClient(srv.url)
        res = infer(client, samples.triggered)
        client.close()
    assert res.as_numpy("flagged").tolist() == [False] * 4
    assert res.as_numpy("label").tolist() == [ATTACK_TARGET] * 4


def test_reflection_describes_the_services(server: ServerThread) -> None:
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("inference.ModelInferRequest")
        assert fd.package == "inference"


def test_flagged_inputs_are_logged_one_line_each_without_the_data(
    server: ServerThread, client: tc.InferenceServerClient, samples: Samples,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="guard.flagged"):
        infer(client, samples.triggered, request_id="audit-1")
    records = [r for r in caplog.records if r.name == "guard.flagged"]
    assert len(records) == 4
    fields = [r.fields for r in records]  # type: ignore[attr-defined]
    assert [f["item"] for f in fields] == [0, 1, 2, 3]
    for f in fields:
        assert f["request_id"] == "audit-1"
        assert f["original_class"] == "stripes_h" and f["corrected_class"] != "stripes_h"
        assert f["p_value"] < 0.005
        assert set(f) == {
            "request_id", "item", "model", "mode", "original_class", "corrected_class",
            "p_value", "statistic",
        }  # fmt: skip
        json.dumps(f)  # serialisable as it stands
