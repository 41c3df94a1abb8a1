"""The committed gRPC stubs are exactly what the .proto sources generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = _generator().generate(tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        committed = ROOT / "adapterhub" / "v1" / path.name
        assert committed.is_file(), f"{committed} is missing: run scripts/gen_proto.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} drifted from the .proto: run scripts/gen_proto.py")
