"""Writing the artifact directory: build everything in a temporary sibling, then move it into
place, so a failure never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from calibrate.errors import CalibrationError
from guard.artifact import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    NETWORK_FILES,
    RANGE_SCHEMA_VERSION,
    START_FILE,
    START_SCHEMA_VERSION,
    sha256_file,
)


def check_output(out: Path, force: bool) -> None:
    """`out` may be created: it does not exist, or force allows replacing a directory."""
    if out.exists() and not force:
        raise CalibrationError(f"output directory {out} already exists (use --force to replace)")
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"output path {out} exists and is not a directory")


@contextlib.contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out`; on success it replaces `out`
    (only with force if `out` exists); on any failure it is removed."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("mmguard", "torch", "torchvision", "onnx", "numpy", "scipy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
            break
    return versions


def write_manifest(root: Path, fields: dict[str, Any]) -> Path:
    """manifest.json = schema version + sha256 of each network + the given fields. Schema 3 when
    the fields carry a range detector, else 2 when they carry a start detector (its network
    must then be in root), else 1."""
    roles = dict(NETWORK_FILES)
    start = "start_detector" in fields
    if start:
        roles[START_FILE[0]] = START_FILE[1]
    files = {}
    for role, name in roles.items():
        path = root / name
        files[role] = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    version = START_SCHEMA_VERSION if start else MANIFEST_SCHEMA_VERSION
    if "range_detector" in fields:
        version = RANGE_SCHEMA_VERSION
    manifest = {"schema_version": version, "files": files, **fields}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path
