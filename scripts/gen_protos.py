"""Regenerate the Python stubs in gen/python from protos/.

Usage: python scripts/gen_protos.py [--out DIR]

Writes messages (`*_pb2.py`), services (`*_pb2_grpc.py`) and type stubs
(`*.pyi`, by mypy-protobuf) for every file under protos/, plus the package
`__init__.py` files, so the code imports as `modelyard.<service>.v1`.
`tests/test_stubs.py` regenerates into a temporary folder and fails when the
result differs from the committed stubs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "gen" / "python"


def generate(out: Path) -> None:
    """Generate all stubs into `out` (replacing its `modelyard` package)."""
    target = out / "modelyard"
    if target.exists():
        shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # protoc-gen-mypy lives beside the interpreter (the venv's bin).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in [target, *[p for p in target.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").write_text(
            '"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n'
        )
    (target / "py.typed").write_text("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default gen/python)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
