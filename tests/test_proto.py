"""The committed generated code matches proto/, and the protocol's layout matches what stock
clients (tritonclient's own copy of the KServe/Triton definition) put on the wire."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from guard._proto import grpc_predict_v2_pb2 as ours

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "guard" / "_proto"
RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]


def test_committed_code_matches_the_proto(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.suffix in (".py", ".pyi")}
    committed = {p.name: p.read_text() for p in GENERATED.iterdir() if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"guard/_proto is stale ({stale}): run `make proto`"


def _fields(desc: Any, prefix: str = "") -> dict[str, tuple[int, int, str | None, bool]]:
    out = {}
    for f in desc.fields:
        kind = f.message_type.full_name if f.message_type else None
        out[f"{prefix}{desc.name}.{f.name}"] = (f.number, f.type, kind, f.is_repeated)
    for nested in desc.nested_types:
        out.update(_fields(nested, f"{prefix}{desc.name}."))
    return out


def test_the_layout_matches_the_stock_client() -> None:
    from tritonclient.grpc import service_pb2 as stock

    assert ours.DESCRIPTOR.package == "inference"
    for name, desc in ours.DESCRIPTOR.message_types_by_name.items():
        mine = _fields(desc)
        theirs = _fields(stock.DESCRIPTOR.message_types_by_name[name])
        # ModelMetadataResponse.properties (field 6) is in the published protocol, not in Triton
        extra = {k for k in mine if k not in theirs}
        assert extra <= {
            "ModelMetadataResponse.properties",
            "ModelMetadataResponse.PropertiesEntry.key",
            "ModelMetadataResponse.PropertiesEntry.value",
        }, extra
        assert {k: v for k, v in mine.items() if k in theirs} == {
            k: theirs[k] for k in mine if k in theirs
        }
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    stock_service = stock.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert [m.name for m in service.methods] == RPCS
    for m in service.methods:
        s = stock_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (
            s.input_type.full_name, s.output_type.full_name,
        )  # fmt: skip
        assert not m.client_streaming and not m.server_streaming


def test_messages_cross_between_the_two_definitions() -> None:
    from tritonclient.grpc import service_pb2 as stock

    req = stock.ModelInferRequest(model_name="m", id="7")
    req.parameters["guard_x"].int64_param = 3
    t = req.inputs.add(name="input", datatype="UINT8", shape=[1, 3])
    t.contents.uint_contents.extend([1, 2, 255])
    mine = ours.ModelInferRequest.FromString(req.SerializeToString())
    assert mine.inputs[0].contents.uint_contents == [1, 2, 255]
    assert mine.parameters["guard_x"].int64_param == 3
    res = ours.ModelInferResponse(model_name="m", raw_output_contents=[b"\x01"])
    res.outputs.add(name="flagged", datatype="BOOL", shape=[1])
    back = stock.ModelInferResponse.FromString(res.SerializeToString())
    assert back.outputs[0].name == "flagged" and back.raw_output_contents == [b"\x01"]
