"""Catalog read throughput next to a no-op RPC on the same server, at several catalog sizes.

    .venv/bin/python benchmarks/catalog_rpc.py [--entries 10000,100000,1000000]
        [--backends sqlite,postgres] [--seconds 3] [--concurrency 16] [--rounds 3]
        [--plot docs/images/catalog-scaling.png]

For each backend and size: fills a fresh catalog (SQLite in a temporary folder, or a
new PostgreSQL database on 127.0.0.1:5432 / $MODELYARD_TEST_POSTGRES_URL) with ENTRIES
model entries (a realistic LlmConfig each, ~1.7 KB serialized), starts
`python -m catalog_service` as its own process and drives it from this process with
asyncio clients for a fixed time per RPC: `grpc.health.v1.Health/Check` (the no-op),
`GetModel` of random entries and `ListModels` pages of 100 (from the start of the
catalog). Rounds alternate the RPCs so machine noise hits all of them alike. Prints
every round (calls/s and the server's CPU µs per call), the median ratios to the
no-op, and at the end how the cost per call moved from the smallest size to the
largest. Targets: GetModel >= 0.8 x the no-op, ListModels(100) >= 0.3 x, cost per call
flat within 1.5x across sizes.

The fill is a bulk insert: one entry goes through `CatalogStore.create_model`, and its
stored rows (entry, tags, labels) are copied for the other ids in large batches
(sqlite3 `executemany`, PostgreSQL `COPY`), so the rows are the store's own format.
With `--plot` (needs matplotlib: `pip install -e .[bench]`) it draws calls/s against
entries for every backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog_service import db  # noqa: E402
from catalog_service.store import CatalogStore  # noqa: E402
from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc, model_pb2  # noqa: E402
from tests.helpers import ServerProcess, health_status  # noqa: E402

CATALOG_SERVICE = "modelyard.catalog.v1.CatalogService"
KINDS = ("noop", "get", "list")
LABELS = {"noop": "no-op", "get": "GetModel", "list": "ListModels(100)"}
BATCH = 10_000


def template() -> model_pb2.Model:
    model = model_pb2.Model(
        display_name="bench",
        author="bench-org",
        state=model_pb2.MODEL_STATE_READY,
        kind=model_pb2.MODEL_KIND_LLM,
        local_path="/models/bench",
        license="apache-2.0",
        tags=["chat", "bench"],
        labels={"team": "nlp"},
    )
    model.source.local.path = "/models/bench"
    llm = model.llm
    llm.architecture = "LlamaForCausalLM"
    llm.model_type = "llama"
    llm.compatible_model_types.extend(["llama"])
    llm.context_length = 8192
    llm.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
    llm.dtype = "bfloat16"
    llm.parameter_count = 8_030_261_248
    llm.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" * 8
    )
    for i in range(8):
        model.files.add(path=f"model-{i:05d}.safetensors", size_bytes=2_000_000_000, sha256="ab" * 32)
    return model


def model_id(i: int) -> str:
    return f"bench-{i:07d}"


# --------------------------------------------------------------------------- bulk fill


def _template_rows(url: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows the store wrote for entry 0: models, model_tags, model_labels (as dicts)."""
    store = CatalogStore(url, auto_migrate=False)
    try:
        store.create_model(model_id(0), template())
    finally:
        store.close()
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            model = dict(conn.execute(select(db.ModelRow.__table__)).one()._mapping)
            tags = [dict(r._mapping) for r in conn.execute(select(db.ModelTagRow.__table__)).all()]
            labels = [dict(r._mapping) for r in conn.execute(select(db.ModelLabelRow.__table__)).all()]
    finally:
        engine.dispose()
    return model, tags, labels


def _batches(entries: int, model: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """Rows for ids 1..entries-1, BATCH at a time: the template with its own id, name and etag."""
    entry = model_pb2.Model.FromString(model["entry"])
    batch: list[dict[str, Any]] = []
    for i in range(1, entries):
        entry.name = "models/" + model_id(i)
        entry.etag = f"{i:016x}"
        batch.append(
            {
                **model,
                "id": i + 1,
                "model_id": model_id(i),
                "etag": entry.etag,
                "entry": entry.SerializeToString(),
            }
        )
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def fill(url: str, entries: int) -> float:
    """Fill a migrated, empty catalog at `url` with `entries` entries; returns seconds taken."""
    started = time.perf_counter()
    model, tags, labels = _template_rows(url)
    columns = list(model)
    engine = db.make_engine(url)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            postgres = engine.dialect.name == "postgresql"
            for batch in _batches(entries, model):
                pks = [row["id"] for row in batch]
                tag_rows = [(pk, t["tag"]) for pk in pks for t in tags]
                label_rows = [(pk, lb["key"], lb["value"]) for pk in pks for lb in labels]
                model_rows = [tuple(row[c] for c in columns) for row in batch]
                if postgres:
                    for table, names, rows in (
                        ("models", columns, model_rows),
                        ("model_tags", ["model_pk", "tag"], tag_rows),
                        ("model_labels", ["model_pk", "key", "value"], label_rows),
                    ):
                        with cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                            for values in rows:
                                copy.write_row(values)
                else:
                    marks = ", ".join("?" * len(columns))
                    cursor.executemany(
                        f"INSERT INTO models ({', '.join(columns)}) VALUES ({marks})", model_rows
                    )
                    cursor.executemany("INSERT INTO model_tags (model_pk, tag) VALUES (?, ?)", tag_rows)
                    cursor.executemany(
                        "INSERT INTO model_labels (model_pk, key, value) VALUES (?, ?, ?)", label_rows
                    )
            if postgres:
                cursor.execute(f"SELECT setval('models_id_seq', {entries + 1})")
            raw.commit()
            if not postgres:
                cursor.execute("ANALYZE")
        finally:
            raw.close()
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE models")
    finally:
        engine.dispose()
    return time.perf_counter() - started


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated catalog database of `backend`."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp}/catalog.db"
        db.migrate(url)
        yield url
        return
    from tests.pg import postgres_database

    with postgres_database("modelyard_bench") as url:
        db.migrate(url)
        yield url


# --------------------------------------------------------------------------- driving


async def drive(address: str, kind: str, seconds: float, concurrency: int, entries: int) -> tuple[float, int]:
    """Calls per second of `kind` over `seconds` with `concurrency` callers, and the call count."""
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        deadline = time.perf_counter() + seconds
        count = 0

        async def caller() -> None:
            nonlocal count
            rng = random.Random()
            while time.perf_counter() < deadline:
                if kind == "noop":
                    await health.Check(health_pb2.HealthCheckRequest())
                elif kind == "get":
                    name = "models/" + model_id(rng.randrange(entries))
                    await catalog.GetModel(catalog_service_pb2.GetModelRequest(name=name))
                else:
                    await catalog.ListModels(catalog_service_pb2.ListModelsRequest(page_size=100))
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.perf_counter() - started), count


@dataclass
class Result:
    """One backend at one size: per-round rates and server CPU µs per call, by kind."""

    backend: str
    entries: int
    fill_seconds: float
    rates: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    rss_mib: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)

    def rate(self, kind: str) -> float:
        return statistics.median(self.rates[kind])

    def cpu_us(self, kind: str) -> float:
        return statistics.median(self.cpu[kind])

    def ratios(self, kind: str) -> list[float]:
        """Per round: rate of `kind` / rate of the no-op."""
        return [r / n for r, n in zip(self.rates[kind], self.rates["noop"], strict=True)]


def measure(backend: str, entries: int, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp, database(backend, Path(tmp)) as url:
        seconds = fill(url, entries)
        print(f"[{backend} {entries}] filled in {seconds:.1f} s", flush=True)
        result = Result(backend, entries, seconds)
        server = ServerProcess(
            "catalog_service",
            ["--data-dir", tmp, "--database-url", url, "--log-level", "WARNING", "--metrics-port", "0"],
            log_path=Path(tmp) / "server.log",
        )
        try:
            server.wait_serving()
            # Ready: the catalog service's own health entry (after the import flow's warm-up,
            # whose seconds of CPU would otherwise land in the first round).
            while health_status(server.address, CATALOG_SERVICE) != health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.05)
            proc = psutil.Process(server.proc.pid)
            for kind in KINDS:  # a short warm-up: connections, code paths
                asyncio.run(drive(server.address, kind, 0.5, args.concurrency, entries))
            load_start = psutil.getloadavg()[0]
            for round_no in range(1, args.rounds + 1):
                for kind in KINDS:
                    before = sum(proc.cpu_times()[:2])
                    rate, calls = asyncio.run(
                        drive(server.address, kind, args.seconds, args.concurrency, entries)
                    )
                    result.cpu[kind].append((sum(proc.cpu_times()[:2]) - before) / calls * 1e6)
                    result.rates[kind].append(rate)
                print(
                    f"[{backend} {entries}] round {round_no}: "
                    + "  ".join(
                        f"{LABELS[k]} {result.rates[k][-1]:6.0f}/s ({result.cpu[k][-1]:4.0f} us)"
                        for k in KINDS
                    ),
                    flush=True,
                )
            result.load = (load_start, psutil.getloadavg()[0])
            result.rss_mib = proc.memory_info().rss / 2**20
        finally:
            server.stop()
    report(result)
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(r: Result) -> None:
    get, listing = r.ratios("get"), r.ratios("list")
    print(
        f"[{r.backend} {r.entries}] median calls/s: no-op {r.rate('noop'):.0f}, "
        f"GetModel {r.rate('get'):.0f}, "
        f"ListModels(100) {r.rate('list'):.0f}; server CPU us/call: "
        + ", ".join(f"{LABELS[k]} {r.cpu_us(k):.0f}" for k in KINDS)
    )
    print(
        f"[{r.backend} {r.entries}] GetModel / no-op per round: {spread(get)} (target >= 0.8); "
        f"ListModels / no-op: {spread(listing)} (target >= 0.3); "
        f"server RSS {r.rss_mib:.0f} MiB; load {r.load[0]:.1f} -> {r.load[1]:.1f}",
        flush=True,
    )


def summary(results: list[Result]) -> None:
    print("\nsummary (medians over rounds; ratios per round: median (min-max))")
    print(
        "| backend | entries | no-op /s | GetModel /s | ListModels /s "
        "| GetModel / no-op | ListModels / no-op |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.backend} | {r.entries:,} | {r.rate('noop'):.0f} | {r.rate('get'):.0f} "
            f"| {r.rate('list'):.0f} "
            f"| {spread(r.ratios('get'))} | {spread(r.ratios('list'))} |"
        )
    for backend in dict.fromkeys(r.backend for r in results):
        mine = sorted((r for r in results if r.backend == backend), key=lambda r: r.entries)
        if len(mine) < 2:
            continue
        for kind in ("get", "list"):
            # Cost per call relative to the no-op of the same run: machine load cancels out.
            cost = [r.rate("noop") / r.rate(kind) for r in mine]
            cpu = [r.cpu_us(kind) for r in mine]
            print(
                f"{backend} {LABELS[kind]}: cost per call (no-op calls per call) "
                + ", ".join(f"{r.entries:,}: {c:.2f}" for r, c in zip(mine, cost, strict=True))
                + f"; max / min = {max(cost) / min(cost):.2f} (target <= 1.5); "
                + "server CPU us "
                + ", ".join(f"{c:.0f}" for c in cpu)
            )


def plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e .[bench]); {path} not written")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"noop": ":", "get": "-", "list": "--"}
    for backend in dict.fromkeys(r.backend for r in results):
        mine = sorted((r for r in results if r.backend == backend), key=lambda r: r.entries)
        sizes = [r.entries for r in mine]
        for kind in KINDS:
            axes.plot(
                sizes,
                [r.rate(kind) for r in mine],
                styles[kind],
                marker="o",
                label=f"{backend} {LABELS[kind]}",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("catalog entries")
    axes.set_ylabel("calls/s (median over rounds)")
    axes.set_title("Catalog reads vs catalog size (one server process, 16 callers)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10000", help="comma-separated catalog sizes")
    parser.add_argument("--backends", default="sqlite", help="comma-separated: sqlite, postgres")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of calls/s vs entries")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.entries.split(",") if s]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in ("sqlite", "postgres"):
            parser.error(f"unknown backend {backend!r}")
    print(f"load average at the start: {psutil.getloadavg()[0]:.1f} ({psutil.cpu_count()} cores)")
    results = [measure(backend, size, args) for backend in backends for size in sizes]
    summary(results)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
