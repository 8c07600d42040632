"""Signed artifacts: `mmguard keygen`, `sign` and `verify`, and `mmguard serve --trusted-key`,
which refuses an artifact whose manifest is unsigned, signed by another key, or changed after
signing, and serves a signed one (its metadata names the key)."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import tritonclient.grpc as tc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from guard.artifact import ArtifactError, load_artifact
from guard.signing import SIGNATURE_NAME, load_public_key
from tests.conftest import Samples
from tests.helpers import run_cli
from tests.serving import metadata_properties, running, serve_config

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch
MODEL = "tiny"  # the session artifact's name


@pytest.fixture
def art(artifact_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session artifact this test may sign and damage."""
    return Path(shutil.copytree(artifact_dir, tmp_path / "art"))


def _keygen(prefix: Path) -> tuple[Path, Path, str]:
    code, out, err = run_cli(["keygen", str(prefix)])
    assert code == 0, err
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    ident = load_public_key(public).key_id
    assert f"(key {ident})" in out
    return private, public, ident


def _error(argv: list[str], *parts: str) -> str:
    code, out, err = run_cli(argv)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1, err  # one line
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"
    return err


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    private, public, ident = _keygen(tmp_path / "release")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert len(ident) == 16
    before = private.read_bytes()
    _error(["keygen", str(tmp_path / "release")], "already exists")
    assert private.read_bytes() == before


def test_sign_then_verify_and_serve_with_the_trusted_key(
    art: Path, tmp_path: Path, samples: Samples
) -> None:
    private, public, ident = _keygen(tmp_path / "release")
    _, other_public, other_ident = _keygen(tmp_path / "other")
    code, out, err = run_cli(["sign", str(art), "--key", str(private)])
    assert code == 0, err
    assert ident in out and (art / SIGNATURE_NAME).is_file()
    record = json.loads((art / SIGNATURE_NAME).read_text())
    assert record["algorithm"] == "ed25519" and record["key_id"] == ident
    # verified by its key, also among others; without trusted keys only the files are checked
    for keys in ([public], [other_public, public]):
        argv = ["verify", str(art)] + [a for k in keys for a in ("--trusted-key", str(k))]
        code, out, err = run_cli(argv)
        assert code == 0 and f"signed by trusted key {ident}" in out, (out, err)
    code, out, _ = run_cli(["verify", str(art)])
    assert code == 0 and "signed" not in out
    _error(
        ["verify", str(art), "--trusted-key", str(other_public)],
        f"signed by key {ident}", "not trusted", other_ident,
    )  # fmt: skip
    # the real server: serves it, answers as before, and its metadata names the key
    with running(serve_config(art, trusted_keys=(public,))) as srv:
        assert metadata_properties(srv.url, MODEL)["manifest_signed_by"] == ident
        client = tc.InferenceServerClient(srv.url)
        x = tc.InferInput("input", list(samples.triggered.shape), "FP32")
        x.set_data_from_numpy(samples.triggered)
        res = client.infer(MODEL, [x])
        assert res.as_numpy("flagged").all()
        client.close()


def test_the_guard_refuses_what_the_trusted_key_did_not_sign(art: Path, tmp_path: Path) -> None:
    private, public, ident = _keygen(tmp_path / "release")
    trusted = ["--trusted-key", str(public)]
    # unsigned
    _error(["verify", str(art), *trusted], "manifest.sig", "not signed", "mmguard sign")
    # `mmguard serve` stops before binding anything, in one line
    _error(["serve", str(art), *trusted, "--port", "0", "--no-metrics"], "not signed")
    with pytest.raises(ArtifactError, match="not signed"):
        load_artifact(art, trusted_keys=[load_public_key(public)])
    # signed, then changed: one byte of the manifest (alpha 0.005 -> 0.006, still valid JSON)
    assert run_cli(["sign", str(art), "--key", str(private)])[0] == 0
    manifest = (art / "manifest.json").read_bytes()
    assert b'"alpha": 0.005' in manifest
    (art / "manifest.json").write_bytes(manifest.replace(b'"alpha": 0.005', b'"alpha": 0.006'))
    _error(["verify", str(art), *trusted], "does not match manifest.json", ident)
    _error(["serve", str(art), *trusted, "--port", "0", "--no-metrics"], "changed after signing")
    (art / "manifest.json").write_bytes(manifest)
    assert run_cli(["verify", str(art), *trusted])[0] == 0
    # a signature record that is not one
    (art / SIGNATURE_NAME).write_text("not json\n")
    _error(["verify", str(art), *trusted], "not a signature record")
    # what is signed is what was checked: a manifest changed in between is not signed
    from guard.signing import SigningError, load_private_key, sign_artifact

    with pytest.raises(SigningError, match="changed while it was being checked"):
        sign_artifact(art, load_private_key(private), checked=manifest + b" ")


def test_bad_keys_and_damaged_artifacts_are_refused_in_one_line(art: Path, tmp_path: Path) -> None:
    private, public, _ = _keygen(tmp_path / "release")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_private, rsa_public = tmp_path / "rsa.key", tmp_path / "rsa.pub"
    rsa_private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rsa_public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    _error(["sign", str(art), "--key", str(rsa_private)], "not an Ed25519 private key")
    _error(["verify", str(art), "--trusted-key", str(rsa_public)], "not an Ed25519 public key")
    _error(
        ["serve", str(art), "--trusted-key", str(rsa_public), "--port", "0", "--no-metrics"],
        "--trusted-key", "not an Ed25519 public key",
    )  # fmt: skip
    _error(["sign", str(art), "--key", str(public)], "not an unencrypted PEM private key")
    _error(["sign", str(art), "--key", str(tmp_path / "nope.key")], "cannot read private key")
    # verify loads the networks as the guard does: one damaged and then rehashed passes the
    # sha256 check and fails there
    rehashed = tmp_path / "rehashed"
    shutil.copytree(art, rehashed)
    half = (rehashed / "bounded.onnx").read_bytes()
    (rehashed / "bounded.onnx").write_bytes(half[: len(half) // 2])
    manifest = json.loads((rehashed / "manifest.json").read_text())
    manifest["files"]["bounded"]["sha256"] = hashlib.sha256(half[: len(half) // 2]).hexdigest()
    (rehashed / "manifest.json").write_text(json.dumps(manifest))
    _error(["verify", str(rehashed)], "onnxruntime cannot load bounded.onnx")
    # a damaged network file: never signed
    bounded = art / "bounded.onnx"
    data = bytearray(bounded.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bounded.write_bytes(bytes(data))
    _error(["sign", str(art), "--key", str(private)], "bounded.onnx", "sha256")
    assert not (art / SIGNATURE_NAME).exists()
