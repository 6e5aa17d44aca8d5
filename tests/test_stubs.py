"""The committed stubs in gen/python are exactly what the protos generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, tool


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    fresh = _files(tmp_path / "modelyard")
    committed = _files(ROOT / "gen" / "python" / "modelyard")
    assert sorted(fresh) == sorted(committed), "stub files differ: run `python scripts/gen_protos.py`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python scripts/gen_protos.py` and commit gen/"


def test_protos_pass_buf_lint() -> None:
    result = subprocess.run([tool("buf"), "lint"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_as_modelyard_packages() -> None:
    from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
    from modelyard.inference.v1 import inference_service_pb2
    from modelyard.trainer.v1 import trainer_service_pb2

    assert catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"]
    assert hasattr(catalog_service_pb2_grpc, "CatalogServiceStub")
    assert trainer_service_pb2.DESCRIPTOR.package == "modelyard.trainer.v1"
    assert inference_service_pb2.DESCRIPTOR.package == "modelyard.inference.v1"
