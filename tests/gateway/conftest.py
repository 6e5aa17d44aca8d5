"""Fixtures of the gateway tests: a tiny Llama and its LoRA, and the gateway on a loop thread.

The gateway runs as `modelyard serve gateway` runs it (`gateway.server.GatewayServer`:
uvicorn on a free port), in-process on a loop thread of its own, in front of real gRPC
servers (`tests.servers.ThreadedServer`); tests drive it with OpenAI's own client.
"""

from __future__ import annotations

import os

# vLLM reads these when its engine starts; set before any test imports it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.server import GatewayServer
from gateway.settings import GatewaySettings
from tinymodels.llm import build_llm, build_lora_adapter


class ThreadedGateway:
    """A `GatewayServer` on 127.0.0.1 (free port) in a background event loop."""

    def __init__(self, catalog_address: str, data_dir: Path, **settings: Any) -> None:
        self.settings = GatewaySettings(
            data_dir=data_dir,
            address="127.0.0.1:0",
            catalog_address=catalog_address,
            grace_seconds=1,
            **settings,
        )
        self.server = GatewayServer(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-gateway", daemon=True)
        self._thread.start()
        self.port = self.run(self.server.start())

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = "none", **options: Any) -> openai.OpenAI:
        """An OpenAI client of this gateway (no retries: tests see every status)."""
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **options)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the gateway's loop and wait for its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        """Stop the gateway and its loop."""
        try:
            self.run(self.server.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama (random weights, ChatML template, context 256)."""
    return build_llm(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_lora(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA adapter of `tiny_llm` with random (non-zero) weights."""
    return build_lora_adapter(tiny_llm, tmp_path_factory.mktemp("adapters") / "tiny-llama-lora", r=8)
