"""Regenerate the Python gRPC stubs in adapterhub/v1 from proto/adapterhub/v1/*.proto.

The stubs are committed; tests/test_proto_stubs.py fails when they drift from the .proto.
Usage: python scripts/gen_proto.py [OUT_ROOT]   (default: the repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_root: Path) -> list[Path]:
    protos = sorted((ROOT / "proto" / "adapterhub" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_root / "adapterhub" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs of the public API (package adapterhub.v1)."""\n')
    return sorted((out_root / "adapterhub" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
