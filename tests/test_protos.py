"""The committed gRPC stubs are exactly what `make proto` generates from protos/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_stubs_match_protos(tmp_path):
    from grpc_tools import protoc

    shutil.copytree(PROTOS / "prism", tmp_path / "prism", ignore=shutil.ignore_patterns("*.py*"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.proto"))
    args = ["protoc", f"-I{tmp_path}", *(f"--{k}_out={tmp_path}" for k in ("python", "pyi"))]
    args += [f"--grpc_python_out={tmp_path}", *protos]
    assert protoc.main(args) == 0
    generated = sorted(p for p in tmp_path.rglob("*") if p.name.endswith(SUFFIXES))
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = PROTOS / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        if committed.read_bytes() != fresh.read_bytes():
            pytest.fail(f"{committed.relative_to(ROOT)} differs from protos/: run `make proto`")
    committed_stubs = sorted(p for p in PROTOS.rglob("*") if p.name.endswith(SUFFIXES))
    assert len(committed_stubs) == len(generated), "stale stubs without a .proto"
