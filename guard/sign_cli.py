"""`mmguard keygen`, `mmguard sign` and `mmguard verify`: Ed25519 signatures over an artifact's
manifest (guard.signing), without torch.

    mmguard keygen keys/release            # keys/release.key (0600) and keys/release.pub
    mmguard sign artifacts/my-model --key keys/release.key
    mmguard verify artifacts/my-model --trusted-key keys/release.pub
    mmguard serve artifacts/my-model --trusted-key keys/release.pub
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    k = sub.add_parser(
        "keygen",
        help="write an Ed25519 key pair for signing artifacts",
        description="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public), PEM.",
    )
    k.add_argument("prefix", type=Path, metavar="PREFIX")
    s = sub.add_parser(
        "sign",
        help="sign an artifact's manifest (writes manifest.sig)",
        description="Check the artifact (manifest schema, every file's sha256), then sign "
        "manifest.json's bytes with an Ed25519 private key into ARTIFACT_DIR/manifest.sig.",
    )
    s.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR")
    s.add_argument("--key", type=Path, required=True, help="PEM Ed25519 private key")
    v = sub.add_parser(
        "verify",
        help="check an artifact as `mmguard serve` would, without serving it",
        description="Check the manifest, every file's sha256, that onnxruntime loads the "
        "networks (on the CPU) and, with --trusted-key, the manifest's signature. Exit 0 when "
        "the guard would accept the artifact, 2 otherwise.",
    )
    v.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR")
    v.add_argument(
        "--trusted-key", type=Path, action="append", default=[], metavar="PUB",
        help="PEM Ed25519 public key (repeatable): the manifest must be signed by one of them",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Returns the exit status; any problem is one line on stderr and status 2."""
    from guard.artifact import MANIFEST_NAME, ArtifactError, load_artifact
    from guard.signing import SigningError, generate_keypair, key_id, load_private_key

    try:
        if args.command == "keygen":
            private, public = generate_keypair(args.prefix)
            ident = key_id(load_private_key(private).public_key())
            print(f"wrote {private} (private: keep it secret) and {public} (key {ident})")
            return 0
        if args.command == "sign":
            from guard.signing import sign_artifact

            key = load_private_key(args.key)
            try:
                checked = (args.artifact_dir / MANIFEST_NAME).read_bytes()
            except OSError:
                checked = None  # load_artifact names the problem
            art = load_artifact(args.artifact_dir)  # never sign a damaged artifact
            out = sign_artifact(args.artifact_dir, key, checked)
            print(f"signed {art.name}: {out} (key {key_id(key.public_key())})")
            return 0
        from guard.engine import EngineError, GuardEngine
        from guard.signing import load_trusted_keys

        art = load_artifact(args.artifact_dir, trusted_keys=load_trusted_keys(args.trusted_key))
        try:  # as the guard loads them (on the CPU): a network onnxruntime cannot load fails
            GuardEngine(art, "cpu", threads=1)
        except EngineError as exc:
            raise ArtifactError(str(exc)) from None
        signed = f", manifest signed by trusted key {art.signed_by}" if art.signed_by else ""
        print(f"ok: {art.name}: manifest, sha256 of every file and onnxruntime load{signed}")
        return 0
    except (ArtifactError, SigningError) as exc:
        print(f"mmguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
