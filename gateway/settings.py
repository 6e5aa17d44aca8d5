"""Gateway settings (flags and `MODELYARD_*` environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from server_kit.common import CommonSettings
from server_kit.settings import setting


@dataclass
class GatewaySettings(CommonSettings):
    """Settings of the OpenAI-compatible HTTP gateway.

    TLS of the HTTP port comes from the common `MODELYARD_TLS_CERT` / `MODELYARD_TLS_KEY`
    (and `MODELYARD_TLS_CLIENT_CA` for client certificates); the gateway's own calls to
    the services use `MODELYARD_CA_CERT` and the client certificate settings. Callers'
    bearer tokens are forwarded to the services, which check them (the gateway keeps no
    token table of its own).
    """

    address: str = setting(
        "127.0.0.1:8000", "MODELYARD_GATEWAY_ADDRESS", "host:port the HTTP gateway listens on"
    )
    catalog_address: str = setting(
        "localhost:50051", "MODELYARD_CATALOG_ADDRESS", "catalog the gateway lists and routes models with"
    )
    trust_request_chat_template: bool = setting(
        False,
        "MODELYARD_GATEWAY_TRUST_REQUEST_CHAT_TEMPLATE",
        "accept a chat_template sent in a request (else 400; the model's own template is used)",
    )
    request_timeout: float = setting(
        600.0,
        "MODELYARD_GATEWAY_REQUEST_TIMEOUT",
        "seconds a unary request may take, loading the model on first use included",
    )
    route_refresh_seconds: float = setting(
        10.0, "MODELYARD_GATEWAY_ROUTE_REFRESH_SECONDS", "seconds a FindWorkers answer is reused"
    )
