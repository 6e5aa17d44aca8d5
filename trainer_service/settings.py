"""Trainer settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from server_kit.common import CommonSettings
from server_kit.settings import setting


def default_datasets_cache() -> Path:
    """The `datasets` cache: HF_DATASETS_CACHE, HF_HOME/datasets, ~/.cache/huggingface/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))).expanduser()
    return home / "datasets"


@dataclass
class TrainerSettings(CommonSettings):
    """Settings of the trainer service."""

    listen: str = setting("[::]:50052", "MODELYARD_TRAINER_LISTEN", "address the trainer service listens on")
    metrics_port: int = setting(
        9092, "MODELYARD_TRAINER_METRICS_PORT", "port of the Prometheus /metrics endpoint (0: off)"
    )
    catalog_address: str = setting(
        "", "MODELYARD_CATALOG_ADDRESS", "catalog to register with and resolve models from (host:port)"
    )
    advertise_address: str = setting(
        "",
        "MODELYARD_TRAINER_ADVERTISE_ADDRESS",
        "address registered with the catalog; default localhost:PORT",
    )
    database_url: str = setting(
        "",
        "MODELYARD_TRAINER_DATABASE_URL",
        "SQLAlchemy URL of the job store; default SQLite at DATA_DIR/trainer.db",
    )
    worker_id: str = setting(
        "",
        "MODELYARD_TRAINER_WORKER_ID",
        "id of this trainer in the catalog and in job claims; default trainer-HOST-HASH(DATA_DIR), "
        "stable across restarts",
    )
    max_concurrent_jobs: int = setting(
        1, "MODELYARD_TRAINER_MAX_CONCURRENT_JOBS", "jobs this trainer runs at once"
    )
    num_processes: int = setting(
        1,
        "MODELYARD_TRAINER_NUM_PROCESSES",
        "processes that train one job together (DDP through torchrun): the GPUs per job; on a CPU, "
        "ranks share the cores",
    )
    lease_seconds: float = setting(
        60.0,
        "MODELYARD_TRAINER_LEASE_SECONDS",
        "a running job's claim lapses this long after its trainer's last renewal (another trainer then "
        "recovers it)",
    )
    poll_seconds: float = setting(
        2.0, "MODELYARD_TRAINER_POLL_SECONDS", "how often the queue is checked for jobs queued elsewhere"
    )
    max_resumes: int = setting(
        3, "MODELYARD_TRAINER_MAX_RESUMES", "times a job is resumed after crashes before it is FAILED"
    )
    dataset_roots: list[Path] = setting(
        [],
        "MODELYARD_TRAINER_DATASET_ROOTS",
        "folders dataset paths may be read from (:-separated); default DATA_DIR only (dataset names are "
        "looked up in the datasets cache regardless)",
    )
    datasets_cache: Path | None = setting(
        None, "MODELYARD_DATASETS_CACHE", "Hugging Face datasets cache; default as the datasets library"
    )
    allow_remote_code: bool = setting(
        False, "MODELYARD_TRAINER_ALLOW_REMOTE_CODE", "train models whose code ships with the weights"
    )
    catalog_token: str = setting(
        "", "MODELYARD_CATALOG_TOKEN", "bearer token for the catalog, when it needs one"
    )

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite under the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'trainer.db'}"

    def resolved_worker_id(self) -> str:
        """This trainer's id: the setting, or one derived from the host name and data folder."""
        if self.worker_id:
            return self.worker_id
        host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:40] or "host"
        digest = hashlib.sha256(str(self.data_dir.expanduser().resolve()).encode()).hexdigest()[:6]
        return f"trainer-{host}-{digest}"

    def resolved_datasets_cache(self) -> Path:
        """The datasets cache folder."""
        return (self.datasets_cache or default_datasets_cache()).expanduser()

    def resolved_dataset_roots(self) -> list[Path]:
        """Folders dataset paths may be read from, resolved: the setting, else the data directory only.

        Never the working directory. Dataset names (`org/name`) are read from the datasets
        cache whatever this says.
        """
        roots = self.dataset_roots or [self.data_dir]
        return [root.expanduser().resolve() for root in roots]
