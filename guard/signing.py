"""Ed25519 signatures over an artifact's manifest.json.

The manifest records the sha256 of every network file, and the guard checks them, so a signature
over the manifest's exact bytes covers the whole artifact. `mmguard sign` writes `manifest.sig`
beside the manifest with a private key; `mmguard serve --trusted-key PUB` then refuses any
artifact without a valid signature by one of the trusted public keys. Without trusted keys the
guard serves as before (the sha256 check alone catches damage, not a replaced artifact).

Keys are PEM files: PKCS#8 private keys and SubjectPublicKeyInfo public keys, the form of
``openssl genpkey -algorithm ed25519`` and ``openssl pkey -pubout`` (or `mmguard keygen`).
A key's id is the first 16 hex digits of the sha256 of its raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.artifact import MANIFEST_NAME

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"


class SigningError(Exception):
    """A key or a signature is missing, malformed, of another kind, or does not verify."""


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    key_id: str
    source: str  # where it was read from, for messages


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(
            f"{path} is not an unencrypted PEM private key ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> TrustedKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key ({str(exc).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return TrustedKey(key, key_id(key), str(path))


def load_trusted_keys(paths: Sequence[Path]) -> list[TrustedKey]:
    """Each PEM public key in `paths` (none: an empty list, signatures not checked)."""
    return [load_public_key(p) for p in paths]


def generate_keypair(prefix: Path) -> tuple[Path, Path]:
    """Write PREFIX.key (private, mode 0600, never overwritten) and PREFIX.pub."""
    prefix = Path(prefix)
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists: not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public_path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    except OSError as exc:
        raise SigningError(
            f"cannot write the key pair at {prefix}: {exc.strerror or exc}"
        ) from None
    return private_path, public_path


def signature_record(manifest_bytes: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """What `manifest.sig` holds: the algorithm, the signer's key id and the signature."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }


def sign_artifact(root: Path, key: Ed25519PrivateKey, checked: bytes | None = None) -> Path:
    """Sign ROOT/manifest.json's bytes; writes ROOT/manifest.sig (replacing an older one).
    `checked`: the manifest bytes the caller verified; the file must still hold exactly them."""
    path = Path(root) / MANIFEST_NAME
    manifest = _read(path, "manifest")
    if checked is not None and manifest != checked:
        raise SigningError(f"{path} changed while it was being checked")
    out = path.with_name(SIGNATURE_NAME)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(signature_record(manifest, key), indent=2) + "\n")
        tmp.replace(out)
    except OSError as exc:
        raise SigningError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def verify_manifest(
    manifest_bytes: bytes, signature_path: Path, trusted: Sequence[TrustedKey]
) -> TrustedKey:
    """The trusted key whose signature `signature_path` holds over exactly these bytes; a
    SigningError naming what is wrong otherwise."""
    if not trusted:
        raise ValueError("verify_manifest needs at least one trusted key")
    if not Path(signature_path).is_file():
        raise SigningError(
            f"{signature_path} is missing: the artifact is not signed, and trusted keys are "
            "required (sign it with `mmguard sign`)"
        )
    try:
        record = json.loads(_read(signature_path, "signature"))
        algorithm, signer = record["algorithm"], str(record["key_id"])
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SigningError(
            f"{signature_path} is not a signature record (algorithm, key_id, signature)"
        ) from None
    if algorithm != ALGORITHM:
        raise SigningError(f"{signature_path} is an {algorithm!r} signature, not {ALGORITHM}")
    matching = [t for t in trusted if t.key_id == signer]
    if not matching:
        ids = ", ".join(t.key_id for t in trusted)
        raise SigningError(
            f"the manifest is signed by key {signer}, which is not trusted (trusted: {ids})"
        )
    for t in matching:
        try:
            t.key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return t
    raise SigningError(
        f"the signature in {signature_path} does not match manifest.json (key {signer}): the "
        "manifest was changed after signing"
    )
