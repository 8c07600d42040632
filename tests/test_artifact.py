"""The calibration artifact: manifest writing, verified loading, atomic staging."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from calibrate.artifact import staging_dir, write_manifest
from calibrate.errors import CalibrationError
from guard.artifact import ArtifactError, load_artifact
from guard.mmdf import DecisionRule, Null

ORIGINAL = b"original network bytes\x00\x01"
BOUNDED = b"bounded network bytes\x02\x03\x04"


def _fields() -> dict[str, Any]:
    return {
        "name": "tiny-cifar",
        "input": {
            "name": "pixels",
            "shape": [3, 32, 32],
            "dtype": "FP32",
            "value_range": [0.0, 1.0],
            "accepts_uint8": True,
        },
        "output": {"name": "logits"},
        "class_names": ["airplane", "cat", "dog"],
        "null": {"kind": "gaussian", "mu": 0.25, "sigma": 0.5, "n": 0},
        "decision": {"alpha": 0.005, "flag_on_disagreement": False},
    }


def _make(root: Path, fields: dict[str, Any] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "original.onnx").write_bytes(ORIGINAL)
    (root / "bounded.onnx").write_bytes(BOUNDED)
    write_manifest(root, _fields() if fields is None else fields)
    return root


def _edit_manifest(root: Path, **changes: Any) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------
# write_manifest / load_artifact


def test_write_manifest_records_hashes(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    m = json.loads((root / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert m["files"]["original"] == {
        "path": "original.onnx",
        "sha256": hashlib.sha256(ORIGINAL).hexdigest(),
        "bytes": len(ORIGINAL),
    }
    assert m["files"]["bounded"]["sha256"] == hashlib.sha256(BOUNDED).hexdigest()
    assert m["files"]["bounded"]["bytes"] == len(BOUNDED)
    assert m["name"] == "tiny-cifar"


def test_write_manifest_rejects_nan(tmp_path: Path) -> None:
    fields = _fields()
    fields["null"]["mu"] = math.nan
    with pytest.raises(ValueError):
        _make(tmp_path / "art", fields)


def test_load_succeeds(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    art = load_artifact(root)
    assert art.name == "tiny-cifar"
    assert art.original_path == root / "original.onnx"
    assert art.bounded_path == root / "bounded.onnx"
    assert art.input.name == "pixels"
    assert art.input.shape == (3, 32, 32)
    assert art.input.dtype == "FP32"
    assert art.input.value_range == (0.0, 1.0)
    assert art.input.accepts_uint8 is True
    assert art.output_name == "logits"
    assert art.class_names == ("airplane", "cat", "dog")
    assert art.null == Null("gaussian", mu=0.25, sigma=0.5)
    assert art.rule == DecisionRule(alpha=0.005, flag_on_disagreement=False)


def test_load_empirical_null(tmp_path: Path) -> None:
    fields = _fields()
    fields["null"] = {"kind": "empirical", "mu": 2.0, "sigma": 1.0, "samples": [1.0, 2.0, 3.0]}
    fields["decision"]["flag_on_disagreement"] = True
    art = load_artifact(_make(tmp_path / "art", fields))
    assert art.null.kind == "empirical" and art.null.samples == (1.0, 2.0, 3.0)
    assert art.rule.flag_on_disagreement is True


def test_load_yeojohnson_null(tmp_path: Path) -> None:
    fields = _fields()
    fields["null"] = {"kind": "yeojohnson", "mu": 0.4, "sigma": 0.7, "lmbda": 0.45}
    art = load_artifact(_make(tmp_path / "art", fields))
    assert art.null == Null("yeojohnson", mu=0.4, sigma=0.7, lmbda=0.45)


def test_load_gpd_null(tmp_path: Path) -> None:
    fields = _fields()
    tail = {"tail_u": 1.5, "tail_zeta": 0.2, "tail_xi": 0.1, "tail_beta": 0.3}
    fields["null"] = {"kind": "gpd", "mu": 1.0, "sigma": 0.5, "samples": [0.5, 1.0, 2.0], **tail}
    art = load_artifact(_make(tmp_path / "art", fields))
    assert art.null == Null("gpd", mu=1.0, sigma=0.5, samples=(0.5, 1.0, 2.0), **tail)


def test_tampered_bounded_file(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    data = bytearray((root / "bounded.onnx").read_bytes())
    data[5] ^= 0x01  # flip one bit of one byte, same size
    (root / "bounded.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"bounded\.onnx.*sha256"):
        load_artifact(root)
    # hashes can be skipped explicitly
    assert load_artifact(root, verify_hashes=False).bounded_path == root / "bounded.onnx"


def test_tampered_original_file(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    (root / "original.onnx").write_bytes(ORIGINAL + b"!")
    with pytest.raises(ArtifactError, match=r"original\.onnx.*sha256"):
        load_artifact(root)


@pytest.mark.parametrize("version", [4, 0, "1", "3", None])
def test_unknown_schema_version(tmp_path: Path, version: Any) -> None:
    root = _make(tmp_path / "art")
    _edit_manifest(root, schema_version=version)
    with pytest.raises(ArtifactError, match="schema_version"):
        load_artifact(root)


def test_missing_schema_version(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    m = json.loads((root / "manifest.json").read_text())
    del m["schema_version"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema_version"):
        load_artifact(root)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        load_artifact(tmp_path / "empty")
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path / "does-not-exist")


def test_manifest_not_json(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="JSON"):
        load_artifact(root)


@pytest.mark.parametrize("name", ["original.onnx", "bounded.onnx"])
def test_missing_network_file(tmp_path: Path, name: str) -> None:
    root = _make(tmp_path / "art")
    (root / name).unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        load_artifact(root)


@pytest.mark.parametrize(
    "null",
    [
        {"kind": "gaussian", "mu": 0.0, "sigma": -1.0},
        {"kind": "gaussian", "mu": 0.0, "sigma": 0.0},
        {"kind": "laplace", "mu": 0.0, "sigma": 1.0},
        {"kind": "gaussian", "mu": 0.0},  # no sigma
        {"kind": "gaussian", "mu": "zero", "sigma": 1.0},
        {"kind": "empirical", "mu": 0.0, "sigma": 1.0, "samples": []},
        {"kind": "empirical", "mu": 0.0, "sigma": 1.0, "samples": ["x"]},
        {"kind": "empirical", "mu": 0.0, "sigma": 1.0, "samples": 3},
        pytest.param("gaussian"),
    ],
)
def test_malformed_null(tmp_path: Path, null: Any) -> None:
    root = _make(tmp_path / "art")
    _edit_manifest(root, null=null)
    with pytest.raises(ArtifactError):
        load_artifact(root)


def test_malformed_files_entry(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["original"] = "original.onnx"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_artifact(root)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("decision", {"alpha": 0.0, "flag_on_disagreement": False}),
        ("decision", {"alpha": 0.005}),
        ("input", {"name": "pixels", "shape": [3, 32, 32], "dtype": "FP32"}),
        ("input", {"name": "pixels", "shape": "3x32x32", "dtype": "FP32", "value_range": [0, 1]}),
    ],
)
def test_malformed_input_or_decision(tmp_path: Path, key: str, value: Any) -> None:
    root = _make(tmp_path / "art")
    _edit_manifest(root, **{key: value})
    with pytest.raises(ArtifactError, match="malformed"):
        load_artifact(root)


@pytest.mark.parametrize("field", ["name", "null", "decision", "class_names", "output", "input"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    fields = _fields()
    del fields[field]
    root = _make(tmp_path / "art", fields)
    with pytest.raises(ArtifactError, match=field):
        load_artifact(root)


# ---------------------------------------------------------------------------------------------
# staging_dir


def test_staging_fresh_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staging_dir(out, force=False) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        assert list(tmp.iterdir()) == []
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staging_dir(out, force=False) as tmp:
        (tmp / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staging_failure_keeps_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staging_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"


def test_staging_existing_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CalibrationError, match="exists"), staging_dir(out, force=False):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old"


def test_staging_existing_with_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staging_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old- / .tmp- leftovers


def test_staging_out_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(CalibrationError, match="not a directory"), staging_dir(out, force=True):
        pytest.fail("the block must not run")
    assert out.read_text() == "not a directory"


def test_staging_then_load_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "artifact"
    with staging_dir(out, force=False) as tmp:
        _make(tmp)
    art = load_artifact(out)
    assert art.root == out and art.bounded_path == out / "bounded.onnx"


def test_network_path_must_stay_inside_the_artifact(tmp_path: Path) -> None:
    root = _make(tmp_path / "art")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((root / "bounded.onnx").read_bytes())
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["bounded"]["path"] = "../elsewhere.onnx"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="leaves the artifact"):
        load_artifact(root)
