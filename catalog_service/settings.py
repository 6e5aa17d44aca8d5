"""Catalog settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server_kit.common import CommonSettings
from server_kit.settings import setting


def default_hf_cache() -> Path:
    """The HF hub cache huggingface_hub uses: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))).expanduser()
    return home / "hub"


@dataclass
class CatalogSettings(CommonSettings):
    """Settings of the catalog service."""

    listen: str = setting("[::]:50051", "MODELYARD_CATALOG_LISTEN", "address the catalog listens on")
    metrics_port: int = setting(
        9091, "MODELYARD_CATALOG_METRICS_PORT", "port of the Prometheus /metrics endpoint (0: off)"
    )
    database_url: str = setting(
        "", "MODELYARD_CATALOG_DATABASE_URL", "SQLAlchemy URL; default SQLite at DATA_DIR/catalog.db"
    )
    allowed_roots: list[Path] = setting(
        [],
        "MODELYARD_CATALOG_ALLOWED_ROOTS",
        "folders imports may read from (:-separated); default DATA_DIR only (hub ids read the HF cache "
        "whatever this says)",
    )
    hf_cache_dir: Path | None = setting(
        None, "MODELYARD_HF_CACHE", "HF hub cache folder; default as huggingface_hub"
    )
    allow_download: bool = setting(
        False, "MODELYARD_CATALOG_ALLOW_DOWNLOAD", "allow downloads from the HF hub"
    )
    allow_pickle: bool = setting(
        False, "MODELYARD_CATALOG_ALLOW_PICKLE", "allow pickle weights (.bin, .pt, .ckpt)"
    )
    model_overrides: str = setting(
        "", "MODELYARD_CATALOG_MODEL_OVERRIDES", "ResolveModel overrides: NAME=PATH pairs separated by commas"
    )
    heartbeat_ttl_seconds: int = setting(
        30, "MODELYARD_CATALOG_HEARTBEAT_TTL", "seconds without heartbeat before a worker is UNAVAILABLE"
    )

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite under the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.db'}"

    def resolved_hf_cache(self) -> Path:
        """The HF hub cache folder."""
        return self.hf_cache_dir or default_hf_cache()

    def path_overrides(self) -> dict[str, Path]:
        """ResolveModel overrides parsed from `model_overrides`."""
        pairs = [item.split("=", 1) for item in self.model_overrides.split(",") if "=" in item]
        return {name.strip(): Path(path.strip()).expanduser() for name, path in pairs}

    def resolved_allowed_roots(self) -> list[Path]:
        """Allowed import roots, resolved: the setting, else the data directory only.

        Never the working directory: a catalog started in `/` or a home folder must not
        read everything below it. Hub ids are read from the HF cache regardless (each
        snapshot is confined to its own repo folder).
        """
        roots = self.allowed_roots or [self.data_dir]
        return [root.expanduser().resolve() for root in roots]
