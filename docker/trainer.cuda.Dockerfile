# Modelyard trainer (CUDA): fine-tuning jobs on NVIDIA GPUs, QLoRA included.
#   gRPC :50052 (grpc.health.v1 + reflection), Prometheus metrics :9092.
# PyPI's Linux torch wheel bundles the CUDA runtime (nvidia-* wheels), so the base stays
# python:3.11-slim; the host (or the Kubernetes device plugin) provides the driver.
# Multi-GPU training runs through `accelerate launch` / `torchrun` inside the container.
#
# Build from the repository root:
#   docker build -f docker/trainer.cuda.Dockerfile -t modelyard/trainer-cuda:0.1.0 .
# Run: docker run --gpus all ... modelyard/trainer-cuda:0.1.0

# ---- build ----
FROM python:3.11.13-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# PyPI's default Linux x86_64 torch wheel is the CUDA build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY server_kit ./server_kit
COPY catalog_service ./catalog_service
COPY trainer_service ./trainer_service
COPY inference_service ./inference_service
COPY clients ./clients
# bitsandbytes: 4-bit base weights for QLoRA (CUDA only; not in the `train` extra, which
# also serves CPU machines).
ARG BITSANDBYTES_VERSION=0.50.2
RUN pip install --no-cache-dir "./[train,postgres]" "bitsandbytes==${BITSANDBYTES_VERSION}"

# ---- runtime ----
FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="modelyard-trainer-cuda" \
      org.opencontainers.image.description="Modelyard trainer gRPC service (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Triton (torch.compile, bitsandbytes kernels) compiles small C launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
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
EXPOSE 50052 9092

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "server_kit.healthcheck", "localhost:50052"]

ENTRYPOINT ["python", "-m", "trainer_service"]
