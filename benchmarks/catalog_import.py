"""Import costs: the first ImportModel after a catalog starts vs later ones, and hashing vs OpenSSL.

    .venv/bin/python benchmarks/catalog_import.py [--starts 3] [--imports 4] [--hash-mib 1024] [--rounds 5]

Import: builds a tiny Llama (~0.6 MB, `tinymodels.llm.build_llm`), then STARTS times
starts `python -m catalog_service` as its own process, waits until its
`modelyard.catalog.v1.CatalogService` health entry is SERVING (what a readiness probe
waits for; the catalog warms its import flow up first, see `catalog_service.warmup`), and
imports the folder IMPORTS times in a row (each a new version), timing each call from
the client. Prints per start the first import, the median of the later ones and the
difference (target: the first within 0.5 s of the later ones).

Hashing: writes a file of HASH_MIB MiB of random bytes (read once before measuring, so
both sides read from the page cache), then ROUNDS times, alternating which goes first,
times `openssl dgst -sha256 FILE` (a process) and `catalog_service.hashing.hash_file`
(in this process) on it. Prints the rates and the ratio per round (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from grpc_health.v1 import health_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog_service import hashing  # noqa: E402
from clients.catalog import CatalogClient  # noqa: E402
from tests.helpers import ServerProcess, health_status  # noqa: E402
from tinymodels.llm import build_llm  # noqa: E402

CATALOG_SERVICE = "modelyard.catalog.v1.CatalogService"


def spread(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def measure_imports(root: Path, starts: int, imports: int) -> list[float]:
    """The difference first - median(later) per start, in seconds."""
    model = build_llm(root / "tiny-llama")
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    print(f"model: {model} ({size / 1e6:.2f} MB)")
    gaps: list[float] = []
    for start in range(1, starts + 1):
        server = ServerProcess(
            "catalog_service",
            ["--data-dir", str(root / f"data-{start}"), "--log-level", "WARNING", "--metrics-port", "0"],
            env={"MODELYARD_CATALOG_ALLOWED_ROOTS": str(root)},
            log_path=root / f"server-{start}.log",
        )
        try:
            server.wait_serving()
            began = time.perf_counter()
            # Ready (what a readiness probe waits for): the service's own health entry.
            while health_status(server.address, CATALOG_SERVICE) != health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.05)
            ready = time.perf_counter() - began
            times: list[float] = []
            with CatalogClient(server.address) as client:
                for _ in range(imports):
                    began = time.perf_counter()
                    client.import_model(str(model))
                    times.append(time.perf_counter() - began)
        finally:
            server.stop()
        later = statistics.median(times[1:])
        gaps.append(times[0] - later)
        print(
            f"start {start}: ready {ready:.1f} s after the server; first import {times[0]:.2f} s, "
            f"later {spread(times[1:], ' s')}, first - later = {times[0] - later:+.2f} s",
            flush=True,
        )
    return gaps


def measure_hashing(root: Path, mib: int, rounds: int) -> list[float]:
    """hash_file rate / openssl rate, per round."""
    path = root / "blob.bin"
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    hashing.hash_file(path)  # into the page cache
    ratios: list[float] = []
    for round_no in range(1, rounds + 1):
        timings: dict[str, float] = {}
        digests: dict[str, str] = {}
        for who in ("openssl", "ours") if round_no % 2 else ("ours", "openssl"):
            began = time.perf_counter()
            if who == "openssl":
                done = subprocess.run(
                    ["openssl", "dgst", "-sha256", str(path)], capture_output=True, check=True
                )
                digests[who] = done.stdout.split()[-1].decode()
            else:
                digests[who] = hashing.hash_file(path)[1]
            timings[who] = time.perf_counter() - began
        assert digests["ours"] == digests["openssl"], "different digests"
        ratio = timings["openssl"] / timings["ours"]
        ratios.append(ratio)
        print(
            f"round {round_no}: openssl {mib / 1024 / timings['openssl']:.2f} GiB/s, "
            f"hash_file {mib / 1024 / timings['ours']:.2f} GiB/s, ratio {ratio:.2f}",
            flush=True,
        )
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="catalog processes started (import part)")
    parser.add_argument("--imports", type=int, default=4, help="imports per started catalog")
    parser.add_argument("--hash-mib", type=int, default=1024, help="size of the hashed file (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="hashing rounds")
    args = parser.parse_args()
    print(f"load average at the start: {psutil.getloadavg()[0]:.1f} ({psutil.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gaps = measure_imports(root, args.starts, args.imports) if args.starts else []
        ratios = measure_hashing(root, args.hash_mib, args.rounds) if args.hash_mib else []
    if gaps:
        print(f"first import - later imports: {spread(gaps, ' s')} over {len(gaps)} starts (target <= 0.5 s)")
    if ratios:
        print(f"hash_file / openssl dgst -sha256: {spread(ratios)} over {len(ratios)} rounds (target >= 0.9)")
    print(f"load average at the end: {psutil.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
