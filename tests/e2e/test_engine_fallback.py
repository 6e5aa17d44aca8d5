"""A model vLLM cannot run, on the default worker of `modelyard serve all` (vLLM, then
transformers): the route says so before anything loads, the model generates on the
transformers engine, and the worker keeps serving everything else, with no engine crash.

The model is a Qwen2-style model with hidden size 64 and 4 attention heads: head size 16,
which vLLM's CPU attention refuses at its first forward step (it kills vLLM's EngineCore).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.catalog import CatalogClient
from modelyard.catalog.v1 import worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.helpers import free_port, health_status, tool
from tinymodels.gguf_file import build_gguf
from tinymodels.llm import build_llm

KV_CACHE_BYTES = 64 * 1024 * 1024


@dataclass
class ServeAll:
    """`modelyard serve all` as a process, with the addresses of its three services."""

    proc: subprocess.Popen[bytes]
    catalog: str
    inference: str
    env: dict[str, str]
    log: Path

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("modelyard"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def serve_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeAll]:
    root = tmp_path_factory.mktemp("serve-all")
    ports = {name: free_port() for name in ("catalog", "trainer", "inference")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    env.update(
        {
            "MODELYARD_DATA_DIR": str(root / "data"),
            "MODELYARD_CATALOG_LISTEN": f"127.0.0.1:{ports['catalog']}",
            "MODELYARD_TRAINER_LISTEN": f"127.0.0.1:{ports['trainer']}",
            "MODELYARD_INFERENCE_LISTEN": f"127.0.0.1:{ports['inference']}",
            "MODELYARD_CATALOG_METRICS_PORT": "0",
            "MODELYARD_TRAINER_METRICS_PORT": "0",
            "MODELYARD_INFERENCE_METRICS_PORT": "0",
            "MODELYARD_CATALOG_ALLOWED_ROOTS": str(root),
            "MODELYARD_INFERENCE_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
            "MODELYARD_INFERENCE_ENFORCE_EAGER": "true",
            "MODELYARD_INFERENCE_MAX_NUM_SEQS": "4",
            "MODELYARD_INFERENCE_WORKER_ID": "inference-auto",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = root / "serve-all.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [tool("modelyard"), "serve", "all"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    catalog, inference = f"127.0.0.1:{ports['catalog']}", f"127.0.0.1:{ports['inference']}"
    env["MODELYARD_CATALOG_ADDRESS"] = catalog
    env["MODELYARD_INFERENCE_ADDRESS"] = inference
    suite = ServeAll(proc, catalog, inference, env, log)
    try:
        deadline = time.monotonic() + 240
        while health_status(inference) != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        with CatalogClient(catalog) as client:
            client.import_model(
                str(build_llm(root / "qwen-head16", "qwen2", num_heads=4, num_kv_heads=2)),
                model_id="qwen-head16",
            )
            llama = build_llm(root / "llama", "llama")
            client.import_model(str(llama), model_id="llama")
            gguf = build_gguf(root / "gguf" / "tiny-llama-q8_0.gguf", tensor_type="q8_0", source_dir=llama)
            client.import_model(str(gguf), model_id="llama-gguf")
            while not any(w.role == worker_pb2.WORKER_ROLE_INFERENCE for w in client.list_workers()):
                assert time.monotonic() < deadline, "the inference worker never registered"
                time.sleep(0.2)
        yield suite
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_route_names_the_transformers_engine_and_vllms_reason_before_anything_loads(
    serve_all: ServeAll,
) -> None:
    routed = serve_all.cli("route", "qwen-head16")
    assert routed.returncode == 0, routed.stdout + routed.stderr
    out = routed.stdout
    assert "transformers, COMPATIBLE_WITH_WARNINGS" in out
    assert "fallback engine: vllm cannot run it (attention: attention head size 16 is not supported" in out
    assert "also on this worker: vllm (INCOMPATIBLE): attention:" in out
    # The model vLLM runs is routed to vLLM on the same worker, the GGUF file to llama.cpp.
    assert "vllm, COMPATIBLE" in serve_all.cli("route", "llama").stdout
    gguf = serve_all.cli("route", "llama-gguf").stdout
    assert "llama-cpp, COMPATIBLE" in gguf and "does not load it" in gguf


def test_a_dry_run_on_the_worker_names_the_engine_that_would_serve_each_model(serve_all: ServeAll) -> None:
    checked = serve_all.cli("route", "qwen-head16", "--worker", "inference-auto", "--dry-run")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "PASS  dry_run" in checked.stdout
    assert "the worker's engines validated it: transformers" in checked.stdout
    checked = serve_all.cli("route", "llama", "--worker", "inference-auto", "--dry-run")
    assert "the worker's engines validated it: vllm" in checked.stdout
    # vLLM's dry run of llama is now on record: the observed rule passes.
    assert "PASS  observed" in checked.stdout and "vllm 0.32.0 validated this model" in checked.stdout


def test_a_gguf_file_generates_on_llama_cpp(serve_all: ServeAll) -> None:
    generated = serve_all.cli("generate", "llama-gguf", "Once upon a time", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert generated.stdout.strip()
    with grpc.insecure_channel(serve_all.inference) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        loaded = {
            m.model: m.engine for m in stub.ListLoadedModels(pb.ListLoadedModelsRequest()).loaded_models
        }
    assert loaded["models/llama-gguf"] == "llama-cpp"


def test_the_model_generates_on_transformers_and_the_worker_keeps_serving(serve_all: ServeAll) -> None:
    generated = serve_all.cli("generate", "qwen-head16", "Once upon a time", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stdout + generated.stderr + serve_all.log.read_text()[-3000:]
    assert generated.stdout.strip()
    generated = serve_all.cli("generate", "llama", "Once upon a time", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # Again: no crash loop, the same engine answers.
    again = serve_all.cli("generate", "qwen-head16", "Hello", "--max-tokens", "4")
    assert again.returncode == 0, again.stdout + again.stderr

    with grpc.insecure_channel(serve_all.inference) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        loaded = {
            m.model: m.engine for m in stub.ListLoadedModels(pb.ListLoadedModelsRequest()).loaded_models
        }
        assert {k: v for k, v in loaded.items() if k != "models/llama-gguf"} == {
            "models/qwen-head16": "transformers",
            "models/llama": "vllm",
        }
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert [e.engine for e in info.engines] == ["vllm", "transformers", "llama-cpp"]
        assert 16 not in info.engines[0].attention_head_sizes and 32 in info.engines[0].attention_head_sizes
    assert health_status(serve_all.inference) == health_pb2.HealthCheckResponse.SERVING
    log = serve_all.log.read_text(errors="replace")
    assert "ENGINE_FAILED" not in log and "EngineCore encountered" not in log
