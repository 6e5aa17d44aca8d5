"""Inference settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from server_kit.common import CommonSettings
from server_kit.settings import setting


@dataclass
class InferenceSettings(CommonSettings):
    """Settings of the inference service."""

    listen: str = setting(
        "[::]:50053", "MODELYARD_INFERENCE_LISTEN", "address the inference service listens on"
    )
    catalog_address: str = setting(
        "", "MODELYARD_CATALOG_ADDRESS", "catalog to register with and resolve models from (host:port)"
    )
    advertise_address: str = setting(
        "",
        "MODELYARD_INFERENCE_ADVERTISE_ADDRESS",
        "address registered with the catalog; default localhost:PORT",
    )
