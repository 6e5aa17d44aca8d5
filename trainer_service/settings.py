"""Trainer settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from server_kit.common import CommonSettings
from server_kit.settings import setting


@dataclass
class TrainerSettings(CommonSettings):
    """Settings of the trainer service."""

    listen: str = setting("[::]:50052", "MODELYARD_TRAINER_LISTEN", "address the trainer service listens on")
    catalog_address: str = setting(
        "", "MODELYARD_CATALOG_ADDRESS", "catalog to register with and resolve models from (host:port)"
    )
    advertise_address: str = setting(
        "",
        "MODELYARD_TRAINER_ADVERTISE_ADDRESS",
        "address registered with the catalog; default localhost:PORT",
    )
