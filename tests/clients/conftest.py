"""Fixtures of the client tests: real servers in a background loop, the real catalog, test doubles."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients import cli
from clients.catalog import CatalogClient
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit.server import GrpcServer
from tests.clients.doubles import FakeInferenceWorker, FakeTrainer, ServerThread, inference_app, trainer_app

ADDRESS_VARIABLES = [
    "MODELYARD_CATALOG_ADDRESS",
    "MODELYARD_TRAINER_ADDRESS",
    "MODELYARD_INFERENCE_ADDRESS",
    "MODELYARD_TOKEN",
    "MODELYARD_CA_CERT",
    "MODELYARD_CLIENT_CERT",
    "MODELYARD_CLIENT_KEY",
]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No address or token from the developer's environment; CLI state under tmp_path."""
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path / "cli-home"))


@pytest.fixture(scope="session")
def server_thread() -> Iterator[ServerThread]:
    """One event loop in a thread for every server the client tests start."""
    servers = ServerThread()
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny llama GGUF files (different weights), built once."""
    from tinymodels.gguf_file import build_gguf

    folder = tmp_path_factory.mktemp("gguf")
    build_gguf(folder / "tiny.gguf", seed=0)
    build_gguf(folder / "tiny-b.gguf", seed=1)
    return folder


@dataclass
class Catalog:
    """A real catalog server on a free port, with a client to it."""

    server: GrpcServer
    address: str
    data_dir: Path
    client: CatalogClient

    def import_gguf(
        self, gguf_dir: Path, name: str, file: str = "tiny.gguf", **kwargs: object
    ) -> model_pb2.Model:
        """Import a copy of one of the GGUF files under the catalog's data dir."""
        target = self.data_dir / "files" / f"{name}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(gguf_dir / file, target)
        return self.client.import_model(str(target), model_id=name, **kwargs)  # type: ignore[arg-type]

    def register(
        self,
        worker_id: str,
        address: str,
        *,
        engine: str = "llama-cpp",
        free_gib: int = 4,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE,
    ) -> worker_pb2.Worker:
        """Register an inference worker described by its capabilities."""
        formats = (
            [model_pb2.WEIGHT_FORMAT_GGUF] if engine == "llama-cpp" else [model_pb2.WEIGHT_FORMAT_SAFETENSORS]
        )
        worker = worker_pb2.Worker(
            address=address,
            role=role,
            capabilities=worker_pb2.WorkerCapabilities(
                engine=engine,
                engine_version="1.0",
                kinds=[model_pb2.MODEL_KIND_LLM],
                architectures=["LlamaForCausalLM"],
                weight_formats=formats,
                quantizations=["gguf"] if engine == "llama-cpp" else [],
                max_context_length=4096,
            ),
            device=worker_pb2.Device(
                type=worker_pb2.DEVICE_TYPE_CPU,
                name="test cpu",
                count=1,
                memory_bytes=16 << 30,
                free_memory_bytes=free_gib << 30,
            ),
        )
        return self.client.register_worker(worker_id, worker).worker


@pytest.fixture
def catalog(server_thread: ServerThread, tmp_path: Path) -> Iterator[Catalog]:
    """A fresh real catalog (SQLite in tmp_path)."""
    data_dir = tmp_path / "catalog"
    settings = CatalogSettings(data_dir=data_dir, allowed_roots=[tmp_path])
    server = server_thread.serve(CatalogApp(settings))
    client = CatalogClient(server.target)
    yield Catalog(server=server, address=server.target, data_dir=data_dir, client=client)
    client.close()
    server_thread.stop(server)


@dataclass
class Served:
    """A test double on a real server."""

    servicer: FakeInferenceWorker | FakeTrainer
    server: GrpcServer
    address: str


@pytest.fixture
def start_worker(server_thread: ServerThread) -> Iterator[Callable[[str], Served]]:
    """Start fake inference workers: `start_worker(text)` -> the served worker."""
    started: list[Served] = []

    def start(text: str = "hello from the fake worker") -> Served:
        worker = FakeInferenceWorker(text)
        server = server_thread.serve(inference_app(worker))
        served = Served(worker, server, server.target)
        started.append(served)
        return served

    yield start
    for served in started:
        server_thread.stop(served.server)


@pytest.fixture
def trainer(server_thread: ServerThread) -> Iterator[Served]:
    """A fake trainer on a real server."""
    fake = FakeTrainer()
    server = server_thread.serve(trainer_app(fake))
    yield Served(fake, server, server.target)
    server_thread.stop(server)


@dataclass
class Result:
    """What a CLI run returned and printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `modelyard ARGS...` in-process; returns the exit code and the captured output."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:  # argparse usage errors and --help
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
