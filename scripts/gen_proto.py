"""Generate guard/_proto from proto/*.proto with grpcio-tools (`make proto`).

protoc writes `import grpc_predict_v2_pb2 as ...` in the service module, which only works with
the output directory on sys.path; the import is rewritten to be package-relative so the code
lives inside `guard._proto`, and the messages are registered in a private descriptor pool (see
DEFAULT_POOL_LINE). tests/test_proto.py runs this into a temporary directory and
compares the result with the committed files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "guard" / "_proto"
# tritonclient registers the same `inference.*` message names from its own grpc_service.proto in
# protobuf's default pool; two different files defining one symbol cannot share that pool, so a
# process importing both (a test, or an application embedding the guard next to a client) would
# fail. The guard's messages therefore live in a private pool; the wire format is unaffected.
DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_LINES = (
    "# a private pool (scripts/gen_proto.py): tritonclient has these names in the default one\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)
INIT_TEXT = '"""Generated from proto/ by scripts/gen_proto.py (`make proto`); do not edit."""\n'


def generate(out: Path) -> list[Path]:
    """Write the generated modules for every proto/*.proto into `out`; returns the files."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    stems = [p.stem for p in protos]
    for path in out.glob("*_pb2*.py"):
        text = path.read_text()
        for stem in stems:
            text = re.sub(
                rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.M
            )
        text = text.replace(DEFAULT_POOL_LINE, PRIVATE_POOL_LINES)
        path.write_text(text)
    (out / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in out.iterdir() if p.suffix in (".py", ".pyi"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
