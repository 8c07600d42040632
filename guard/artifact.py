"""The calibration artifact as the guard sees it: manifest.json plus two ONNX files (three with a
start detector), verified.

Calibration writes schema 1 for the two-network artifact, schema 2 when it adds the start
detector (`files.start` and `start_detector.null`) and schema 3 when it adds the range detector
(`range_detector.output`, a second output of original.onnx, and `range_detector.null`; with or
without a start detector), so a guard that only knows an older schema refuses it instead of
serving it without one of its statistics. The guard refuses an artifact whose schema it does not
know or whose files do not match their recorded sha256. Given trusted public keys, it also
refuses an artifact whose manifest.json is not signed by one of them (guard.signing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.mmdf import DecisionRule, Null, RangeDetector, StartDetector

if TYPE_CHECKING:
    from guard.signing import TrustedKey

MANIFEST_SCHEMA_VERSION = 1
START_SCHEMA_VERSION = 2  # schema 1 plus the start detector
RANGE_SCHEMA_VERSION = 3  # schema 1 or 2 plus the range detector
SCHEMA_VERSIONS = (MANIFEST_SCHEMA_VERSION, START_SCHEMA_VERSION, RANGE_SCHEMA_VERSION)
MANIFEST_NAME = "manifest.json"
NETWORK_FILES = {"original": "original.onnx", "bounded": "bounded.onnx"}
START_FILE = ("start", "start.onnx")  # the start detector's network, schema 2 only


class ArtifactError(Exception):
    """The artifact directory is missing, incomplete, tampered with or of an unknown schema."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # per-example shape [C, H, W]; the batch axis is dynamic
    dtype: str  # "FP32"
    value_range: tuple[float, float]  # what FP32 pixel inputs must lie in
    accepts_uint8: bool  # UINT8 pixels 0..255 are accepted and scaled by 1/255


@dataclass(frozen=True)
class Artifact:
    root: Path
    manifest: dict[str, Any]
    name: str
    original_path: Path
    bounded_path: Path
    input: InputSpec
    output_name: str
    class_names: tuple[str, ...]
    null: Null
    rule: DecisionRule
    # the start detector (schema 2): its network and its statistic's null, else None
    start_path: Path | None = None
    start_null: Null | None = None
    # the range detector (schema 3): the original network's second output and its null
    range_output: str | None = None
    range_null: Null | None = None
    # the id of the trusted key whose signature over manifest.json was verified, else None
    signed_by: str | None = None

    def network_path(self, role: str) -> Path:
        """The file of network `role`: original, bounded or (with a start detector) start."""
        paths = {"original": self.original_path, "bounded": self.bounded_path}
        if self.start_path is not None:
            paths[START_FILE[0]] = self.start_path
        if role not in paths:
            raise ArtifactError(f"the artifact has no {role} network")
        return paths[role]

    def network_bytes(self, role: str) -> bytes:
        """The bytes of network `role`, checked against the manifest's sha256 on these very
        bytes, which are what the engine then loads: a file swapped after `load_artifact`'s
        check is refused, not served."""
        path = self.network_path(role)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
        recorded = self.manifest.get("files", {}).get(role, {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != recorded:
            raise ArtifactError(f"{path.name} does not match the sha256 recorded in the manifest")
        return data

    def start_detector(self, logits: np.ndarray | None) -> StartDetector | None:
        """The start detector on these start-bounded logits; None without one."""
        if logits is None or self.start_null is None:
            return None
        return StartDetector(logits, self.start_null)

    def range_detector(self, ratios: np.ndarray | None) -> RangeDetector | None:
        """The range detector on these activation ratios; None without one."""
        if ratios is None or self.range_null is None:
            return None
        return RangeDetector(ratios, self.range_null)


def _require(manifest: dict[str, Any], *keys: str) -> Any:
    node: Any = manifest
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ArtifactError(f"manifest.json lacks the field {'.'.join(keys)}")
        node = node[k]
    return node


def load_artifact(
    root: Path, verify_hashes: bool = True, trusted_keys: Sequence[TrustedKey] = ()
) -> Artifact:
    """Read and verify an artifact directory; every failure is an ArtifactError naming it.
    With `trusted_keys`, manifest.json's bytes, read once, must carry a valid signature by one
    of them (manifest.sig) before anything in it is believed."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(f"{mpath} does not exist: not a calibration artifact directory")
    try:
        raw = mpath.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {mpath}: {exc.strerror or exc}") from None
    signed_by = None
    if trusted_keys:
        from guard.signing import SIGNATURE_NAME, SigningError, verify_manifest

        try:
            signed_by = verify_manifest(raw, root / SIGNATURE_NAME, trusted_keys).key_id
        except SigningError as exc:
            raise ArtifactError(str(exc)) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from None
    version = _require(manifest, "schema_version")
    if version not in SCHEMA_VERSIONS:
        raise ArtifactError(
            f"manifest schema_version {version!r} is not supported "
            f"(this guard reads {', '.join(map(str, SCHEMA_VERSIONS))})"
        )
    has_start = version == START_SCHEMA_VERSION or (
        version == RANGE_SCHEMA_VERSION and "start_detector" in manifest
    )
    roles = dict(NETWORK_FILES)
    if has_start:
        roles[START_FILE[0]] = START_FILE[1]
    paths = {}
    for role, default in roles.items():
        entry = _require(manifest, "files", role)
        if not isinstance(entry, dict):
            raise ArtifactError(f"manifest.json files.{role} must be an object with path/sha256")
        path = root / str(entry.get("path", default))
        if path.resolve().parent != root.resolve():
            raise ArtifactError(f"{role} network path {entry.get('path')!r} leaves the artifact")
        if not path.is_file():
            raise ArtifactError(f"{role} network file {path} is missing")
        if verify_hashes and sha256_file(path) != _require(manifest, "files", role, "sha256"):
            raise ArtifactError(f"{path.name} does not match the sha256 recorded in the manifest")
        paths[role] = path
    inp = _require(manifest, "input")
    try:
        spec = InputSpec(
            name=str(inp["name"]),
            shape=tuple(int(v) for v in inp["shape"]),
            dtype=str(inp["dtype"]),
            value_range=(float(inp["value_range"][0]), float(inp["value_range"][1])),
            accepts_uint8=bool(inp.get("accepts_uint8", False)),
        )
        null = Null.from_dict(_require(manifest, "null"))
        start_null = None
        if has_start:
            start_null = Null.from_dict(_require(manifest, "start_detector", "null"))
        range_output, range_null = None, None
        if version == RANGE_SCHEMA_VERSION:
            range_output = str(_require(manifest, "range_detector", "output"))
            range_null = Null.from_dict(_require(manifest, "range_detector", "null"))
        decision = _require(manifest, "decision")
        rule = DecisionRule(
            alpha=float(decision["alpha"]),
            flag_on_disagreement=bool(decision["flag_on_disagreement"]),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ArtifactError(f"manifest.json has a malformed input/null/decision: {exc}") from None
    return Artifact(
        root=root,
        manifest=manifest,
        name=str(_require(manifest, "name")),
        original_path=paths["original"],
        bounded_path=paths["bounded"],
        input=spec,
        output_name=str(_require(manifest, "output", "name")),
        class_names=tuple(str(c) for c in _require(manifest, "class_names")),
        null=null,
        rule=rule,
        start_path=paths.get(START_FILE[0]),
        start_null=start_null,
        range_output=range_output,
        range_null=range_null,
        signed_by=signed_by,
    )
