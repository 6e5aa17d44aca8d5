# Modelyard catalog: the model and worker registry.
#   gRPC :50051 (grpc.health.v1 + reflection), Prometheus metrics :9091.
#
# Build from the repository root:
#   docker build -f docker/catalog.Dockerfile -t modelyard/catalog:0.1.0 .
# Run (SQLite under the data volume) or migrate a PostgreSQL database first:
#   docker run --rm -p 50051:50051 -v modelyard-data:/var/lib/modelyard modelyard/catalog:0.1.0
#   docker run --rm -e MODELYARD_CATALOG_DATABASE_URL=postgresql+psycopg://... modelyard/catalog:0.1.0 migrate

# ---- build: install the distribution and its catalog extras into /opt/venv ----
FROM python:3.11.13-slim-bookworm AS build

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
RUN pip install --no-cache-dir "./[postgres]"

# ---- runtime: the venv only, a non-root user, no build tools ----
FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="modelyard-catalog" \
      org.opencontainers.image.description="Modelyard catalog gRPC service" \
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
EXPOSE 50051 9091

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "server_kit.healthcheck", "localhost:50051"]

ENTRYPOINT ["python", "-m", "catalog_service"]
