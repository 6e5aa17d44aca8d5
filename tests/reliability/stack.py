"""A small Modelyard deployment of real processes: a catalog and a vLLM inference worker.

`Stack` starts `python -m catalog_service` (SQLite, a short heartbeat TTL) and
`python -m inference_service` (vLLM on the CPU, registered with the catalog), imports a
model and loads it. The catalog can be killed and restarted on the same address, so the
inference worker's registration sees it go and come back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import psutil

from clients.catalog import CatalogClient
from clients.inference import InferenceClient
from tests.helpers import ServerProcess, free_port
from tests.reliability.faults import serve

MODEL_ID = "tiny-llama"
WORKER_ID = "inference-faults"
HEARTBEAT_TTL_SECONDS = 2
KV_CACHE_BYTES = 64 * 1024 * 1024
ENGINE_CORE_NAME = "VLLM::EngineCore"
"""Process title of vLLM's engine process (a child of the inference server)."""


class Stack:
    """Catalog + vLLM inference as processes, with `MODEL_ID` imported and loaded.

    `max_concurrent_requests` is the inference server's admission limit (beyond it:
    RESOURCE_EXHAUSTED).
    """

    def __init__(
        self,
        root: Path,
        model: Path,
        *,
        max_concurrent_requests: int = 8,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.catalog_port = free_port()
        self.catalog_env = {
            "MODELYARD_CATALOG_ALLOWED_ROOTS": f"{root}:{model.parent}",
            "MODELYARD_CATALOG_HEARTBEAT_TTL": str(HEARTBEAT_TTL_SECONDS),
            **(extra_env or {}),
        }
        self.catalog: ServerProcess | None = None
        self.inference: ServerProcess | None = None
        self._catalog_starts = 0
        try:
            self.catalog = self.start_catalog(root / "catalog")
            with CatalogClient(self.catalog.address) as catalog:
                catalog.import_model(str(model), model_id=MODEL_ID)
            self.inference = serve(
                "inference_service",
                ["--data-dir", str(root / "inference")],
                {
                    "MODELYARD_CATALOG_ADDRESS": f"127.0.0.1:{self.catalog_port}",
                    "MODELYARD_INFERENCE_ENGINE": "vllm",
                    "MODELYARD_INFERENCE_DTYPE": "float32",
                    "MODELYARD_INFERENCE_ENFORCE_EAGER": "1",
                    "MODELYARD_INFERENCE_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
                    "MODELYARD_INFERENCE_MAX_LORA_RANK": "8",
                    "MODELYARD_INFERENCE_MAX_CONCURRENT_REQUESTS": str(max_concurrent_requests),
                    "MODELYARD_INFERENCE_WORKER_ID": WORKER_ID,
                    "VLLM_LOGGING_LEVEL": "WARNING",
                    **(extra_env or {}),
                },
                log_path=root / "inference.log",
            )
            self.inference.wait_serving(600)
            with InferenceClient(self.inference.address) as inference:
                inference.load_model(MODEL_ID, timeout=600)
        except BaseException:
            self.close()
            raise

    def start_catalog(self, data_dir: Path) -> ServerProcess:
        """Start a catalog on the stack's catalog address with its data in `data_dir`."""
        self._catalog_starts += 1
        catalog = serve(
            "catalog_service",
            ["--data-dir", str(data_dir)],
            self.catalog_env,
            log_path=self.root / f"catalog-{self._catalog_starts}.log",
            port=self.catalog_port,
        )
        try:
            catalog.wait_serving()
        except BaseException:
            catalog.stop()
            raise
        self.catalog = catalog
        return catalog

    @property
    def catalog_address(self) -> str:
        """Where the catalog listens (the same across restarts)."""
        return f"127.0.0.1:{self.catalog_port}"

    @property
    def inference_address(self) -> str:
        """Where the inference server listens."""
        assert self.inference is not None
        return self.inference.address

    def engine_cores(self) -> list[psutil.Process]:
        """vLLM's engine processes under the inference server."""
        assert self.inference is not None
        found = []
        for child in psutil.Process(self.inference.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue  # a killed one its parent has not reaped yet
                if child.name() == ENGINE_CORE_NAME or ENGINE_CORE_NAME in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def close(self) -> None:
        """Stop both servers."""
        for process in (self.inference, self.catalog):
            if process is not None:
                process.stop()
