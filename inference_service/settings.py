"""Inference settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from server_kit.common import CommonSettings
from server_kit.settings import setting


@dataclass
class InferenceSettings(CommonSettings):
    """Settings of the inference service."""

    listen: str = setting(
        "[::]:50053", "MODELYARD_INFERENCE_LISTEN", "address the inference service listens on"
    )
    metrics_port: int = setting(
        9093, "MODELYARD_INFERENCE_METRICS_PORT", "port of the Prometheus /metrics endpoint (0: off)"
    )
    catalog_address: str = setting(
        "", "MODELYARD_CATALOG_ADDRESS", "catalog to register with and resolve models from (host:port)"
    )
    advertise_address: str = setting(
        "",
        "MODELYARD_INFERENCE_ADVERTISE_ADDRESS",
        "address registered with the catalog; default localhost:PORT",
    )
    worker_id: str = setting(
        "",
        "MODELYARD_INFERENCE_WORKER_ID",
        "worker id registered with the catalog; default inference-HOSTNAME-PORT",
    )
    engine: str = setting(
        "auto",
        "MODELYARD_INFERENCE_ENGINE",
        "vllm, transformers, llama-cpp (GGUF files), auto (vllm, then transformers for what vllm "
        "cannot run, and llama-cpp when installed), or diffusers (image models)",
    )
    load_on_first_use: bool = setting(
        True,
        "MODELYARD_INFERENCE_LOAD_ON_FIRST_USE",
        "load a model on its first request instead of NOT_FOUND",
    )
    max_concurrent_requests: int = setting(
        64, "MODELYARD_INFERENCE_MAX_CONCURRENT_REQUESTS", "requests at once before RESOURCE_EXHAUSTED"
    )
    kv_cache_memory_bytes: int = setting(
        512 * 1024 * 1024, "MODELYARD_INFERENCE_KV_CACHE_BYTES", "vLLM KV-cache memory per loaded model"
    )
    max_model_len: int = setting(
        0, "MODELYARD_INFERENCE_MAX_MODEL_LEN", "cap on served context length (0: model's)"
    )
    max_num_seqs: int = setting(32, "MODELYARD_INFERENCE_MAX_NUM_SEQS", "vLLM sequences batched at once")
    max_lora_rank: int = setting(64, "MODELYARD_INFERENCE_MAX_LORA_RANK", "largest LoRA rank accepted")
    max_loras: int = setting(4, "MODELYARD_INFERENCE_MAX_LORAS", "LoRA adapters active in one batch")
    tensor_parallel_size: int = setting(
        1, "MODELYARD_INFERENCE_TENSOR_PARALLEL_SIZE", "vLLM tensor parallelism (GPUs per model)"
    )
    dtype: str = setting(
        "auto", "MODELYARD_INFERENCE_DTYPE", "weights dtype: auto, float32, bfloat16, float16"
    )
    enforce_eager: bool = setting(
        False,
        "MODELYARD_INFERENCE_ENFORCE_EAGER",
        "vLLM: skip graph compilation (starts faster, runs slower)",
    )
    diffusers_configs: list[str] = setting(
        [],
        "MODELYARD_INFERENCE_DIFFUSERS_CONFIGS",
        "diffusers: local config folders single-file checkpoints load with, BASE=FOLDER each "
        "(sd15, sd21, sdxl, sdxl-refiner, sd3, flux), ':'-separated",
    )
    diffusers_threads: int = setting(
        1,
        "MODELYARD_INFERENCE_DIFFUSERS_THREADS",
        "diffusers: torch CPU threads of each image engine (1 suits small CPUs)",
    )
    allow_remote_code: bool = setting(
        False, "MODELYARD_INFERENCE_ALLOW_REMOTE_CODE", "allow models that need trust_remote_code"
    )

    def resolved_worker_id(self, port: int) -> str:
        """The worker id, defaulting to `inference-<host>-<port>`."""
        if self.worker_id:
            return self.worker_id
        host = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower()).strip("-") or "host"
        return f"inference-{host}-{port}"[:63].rstrip("-")

    def resolved_advertise_address(self, port: int) -> str:
        """The address clients use, defaulting to `localhost:<port>`."""
        return self.advertise_address or f"localhost:{port}"
