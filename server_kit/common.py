"""Settings every service shares, and the glue that runs a service from them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from server_kit import logs
from server_kit.server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer, ServiceApp, run
from server_kit.settings import default_data_dir, setting


@dataclass
class CommonSettings:
    """Settings shared by every service (each service adds its own)."""

    data_dir: Path = setting(
        default_data_dir(), "MODELYARD_DATA_DIR", "folder for databases, models and jobs"
    )
    log_level: str = setting("INFO", "MODELYARD_LOG_LEVEL", "log level")
    log_format: str = setting("text", "MODELYARD_LOG_FORMAT", "log format: text or json")
    grace_seconds: float = setting(10.0, "MODELYARD_GRACE_SECONDS", "seconds in-flight RPCs get on shutdown")
    drain_seconds: float = setting(
        1.0, "MODELYARD_DRAIN_SECONDS", "seconds health reports NOT_SERVING before new RPCs are refused"
    )
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES, "MODELYARD_MAX_MESSAGE_BYTES", "largest gRPC message accepted or sent"
    )


def make_server(app: ServiceApp, listen: str, settings: CommonSettings) -> GrpcServer:
    """A `GrpcServer` for `app` configured from the common settings."""
    return GrpcServer(
        app,
        listen,
        grace_seconds=settings.grace_seconds,
        drain_seconds=settings.drain_seconds,
        max_message_bytes=settings.max_message_bytes,
    )


def serve_forever(servers: list[GrpcServer], settings: CommonSettings) -> None:
    """Configure logging and run `servers` until SIGTERM/SIGINT."""
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run(servers))
