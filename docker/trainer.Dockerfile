# Modelyard trainer (CPU): fine-tuning jobs (LoRA, full, DPO) with transformers, peft and TRL.
#   gRPC :50052 (grpc.health.v1 + reflection), Prometheus metrics :9092.
# QLoRA needs CUDA (off CUDA, bitsandbytes computes wrong LoRA gradients): use docker/trainer.cuda.Dockerfile for GPU workers.
#
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t modelyard/trainer:0.1.0 .

# ---- build: CPU PyTorch first, then the distribution with its training extras ----
FROM python:3.11.13-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CPU wheel (no CUDA libraries); pip then keeps it for the `torch==2.13.0` requirement.
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
# The last line fails the build if the resolver swapped the CPU torch for a CUDA one.
RUN pip install --no-cache-dir "./[train,postgres]" \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

# ---- runtime ----
FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="modelyard-trainer" \
      org.opencontainers.image.description="Modelyard trainer gRPC service (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

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
EXPOSE 50052 9092

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "server_kit.healthcheck", "localhost:50052"]

ENTRYPOINT ["python", "-m", "trainer_service"]
