"""Channels for the typed clients: options, retries on UNAVAILABLE only, TLS, tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from server_kit import tracing
from server_kit.interceptors import REQUEST_ID_KEY
from server_kit.logs import request_id_var

DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TlsConfig:
    """TLS for a client: the CA to trust and, for mTLS, the client's certificate and key."""

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for this configuration."""

        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def service_config(service: str) -> str:
    """Service config JSON: retry only UNAVAILABLE, up to 4 attempts with backoff."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service}],
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel_options(service: str, tls: TlsConfig | None = None) -> list[tuple[str, object]]:
    """Channel options for `service`."""
    options: list[tuple[str, object]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(service)),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def open_channel(address: str, service: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """A sync channel to `address`."""
    options = channel_options(service, tls)
    if tls is not None:
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    interceptors = tracing.client_interceptors()  # trace context, when tracing is on
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def open_aio_channel(address: str, service: str, tls: TlsConfig | None = None) -> aio.Channel:
    """An asyncio channel to `address`."""
    options = channel_options(service, tls)
    interceptors = tracing.aio_client_interceptors() or None  # trace context, when tracing is on
    if tls is not None:
        return aio.secure_channel(address, tls.credentials(), options=options, interceptors=interceptors)
    return aio.insecure_channel(address, options=options, interceptors=interceptors)


def call_metadata(token: str | None, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Per-call metadata: the bearer token when set, plus `extra`.

    Called while a Modelyard server handles an RPC (a service calling another), it also
    forwards that RPC's request id (`x-request-id`), so both sides log the same id.
    """
    metadata = list(extra)
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    request_id = request_id_var.get()
    if request_id != "-" and not any(key == REQUEST_ID_KEY for key, _ in metadata):
        metadata.append((REQUEST_ID_KEY, request_id))
    return metadata
