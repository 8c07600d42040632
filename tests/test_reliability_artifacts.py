"""Artifacts (reliability): `mmguard serve` refuses to start on a damaged or foreign artifact,
with exit status 2 and one line naming the problem (never a traceback), before it listens: a
changed byte in either ONNX file, the two files swapped, a truncated file, a network
onnxruntime cannot load even though its sha256 was recorded after the damage, a truncated or
empty manifest, a missing file, an unknown, mistyped or missing schema version."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from guard.artifact import ArtifactError
from guard.process import mmguard_command
from tests.helpers import run_cli
from tests.serving import ServerThread, serve_config

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # the artifact is calibrated with torch


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _edit_manifest(art: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _damaged_but_rehashed(art: Path) -> None:
    """bounded.onnx cut in half and its sha256 recorded again: only loading can tell."""
    _truncate(art / "bounded.onnx")
    digest = hashlib.sha256((art / "bounded.onnx").read_bytes()).hexdigest()
    _edit_manifest(art, lambda m: m["files"]["bounded"].update(sha256=digest))


def _cross_entries(art: Path) -> None:
    """The manifest's two paths exchanged, each keeping its own sha256."""

    def edit(m: dict) -> None:
        files = m["files"]
        files["original"]["path"], files["bounded"]["path"] = "bounded.onnx", "original.onnx"

    _edit_manifest(art, edit)


def _schema(version: object) -> Callable[[Path], None]:
    return lambda art: _edit_manifest(art, lambda m: m.update(schema_version=version))


def _no_schema(art: Path) -> None:
    _edit_manifest(art, lambda m: m.pop("schema_version"))


# (case id, damage, fragments the one-line message must contain)
DAMAGE: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("byte-changed-in-original", lambda a: _flip_middle_byte(a / "original.onnx"),
     ("original.onnx", "sha256")),
    ("byte-changed-in-bounded", lambda a: _flip_middle_byte(a / "bounded.onnx"),
     ("bounded.onnx", "sha256")),
    ("networks-swapped", lambda a: _swap(a / "original.onnx", a / "bounded.onnx"),
     ("original.onnx", "sha256")),
    ("manifest-entries-crossed", _cross_entries, ("bounded.onnx", "sha256")),
    ("network-truncated", lambda a: _truncate(a / "original.onnx"), ("original.onnx", "sha256")),
    ("network-damaged-then-rehashed", _damaged_but_rehashed,
     ("onnxruntime cannot load bounded.onnx",)),
    ("network-missing", lambda a: (a / "bounded.onnx").unlink(), ("bounded", "missing")),
    ("manifest-truncated", lambda a: _truncate(a / "manifest.json"),
     ("manifest.json", "not valid JSON")),
    ("manifest-empty", lambda a: (a / "manifest.json").write_text(""),
     ("manifest.json", "not valid JSON")),
    ("manifest-missing", lambda a: (a / "manifest.json").unlink(),
     ("manifest.json", "does not exist")),
    ("schema-version-unknown", _schema(4), ("schema_version 4", "not supported")),
    ("schema-version-zero", _schema(0), ("schema_version 0", "not supported")),
    ("schema-version-a-string", _schema("1"), ("schema_version '1'", "not supported")),
    ("schema-version-missing", _no_schema, ("schema_version",)),
]  # fmt: skip


def _copy(artifact_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "artifact"
    shutil.copytree(artifact_dir, out)
    return out


@pytest.mark.parametrize(("damage", "fragments"), [pytest.param(*c[1:], id=c[0]) for c in DAMAGE])
def test_a_damaged_artifact_is_refused_with_one_line_naming_the_problem(
    artifact_dir: Path, tmp_path: Path, damage: Callable[[Path], object], fragments: tuple[str, ...]
) -> None:
    art = _copy(artifact_dir, tmp_path)
    damage(art)
    code, out, err = run_cli(["serve", str(art), "--port", "0", "--no-metrics", "--threads", "1"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmguard serve: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert out == ""


def test_create_server_raises_artifact_error_naming_the_file(
    artifact_dir: Path, tmp_path: Path
) -> None:
    art = _copy(artifact_dir, tmp_path)
    _flip_middle_byte(art / "bounded.onnx")
    with pytest.raises(ArtifactError, match=r"bounded\.onnx does not match the sha256"):
        ServerThread(serve_config(art))


def test_the_serve_process_exits_2_before_listening_on_swapped_networks(
    artifact_dir: Path, tmp_path: Path
) -> None:
    art = _copy(artifact_dir, tmp_path)
    _swap(art / "original.onnx", art / "bounded.onnx")
    cmd = [*mmguard_command(), "serve", str(art), "--host", "127.0.0.1", "--port", "0",
           "--no-metrics"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "original.onnx does not match the sha256" in done.stderr
    assert "listening" not in done.stderr and "Traceback" not in done.stderr


def test_a_network_swapped_after_the_check_is_refused_when_loaded(
    artifact_dir: Path, tmp_path: Path
) -> None:
    """The engine loads the very bytes it hashes: a file replaced between load_artifact's check
    and the sessions' creation (a valid ONNX network, the other one) is refused, not served."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    art = _copy(artifact_dir, tmp_path)
    checked = load_artifact(art)
    GuardEngine(checked, "cpu", threads=1)  # as checked, it loads
    shutil.copyfile(art / "original.onnx", art / "bounded.onnx")
    with pytest.raises(ArtifactError, match=r"bounded\.onnx does not match the sha256"):
        GuardEngine(checked, "cpu", threads=1)
