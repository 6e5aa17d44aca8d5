"""Settings every service shares, and the glue that runs a service from them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from clients.channel import TlsConfig
from server_kit import logs, security, tracing
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
    # Observability (docs/observability.md); each service has its own metrics port setting.
    otel_exporter: str = setting(
        "none",
        "MODELYARD_OTEL_EXPORTER",
        "trace exporter: none, console or otlp (configured by the standard OTEL_* variables)",
    )
    # Security (docs/security.md): TLS of the server, tokens and roles, audit, own calls.
    tls_cert: Path | None = setting(
        None, "MODELYARD_TLS_CERT", "PEM certificate chain of the server; unset: plaintext"
    )
    tls_key: Path | None = setting(None, "MODELYARD_TLS_KEY", "PEM private key of the server certificate")
    tls_client_ca: Path | None = setting(
        None, "MODELYARD_TLS_CLIENT_CA", "require client certificates signed by this CA (mTLS)"
    )
    tokens_file: Path | None = setting(
        None,
        "MODELYARD_TOKENS_FILE",
        "file of NAME:ROLE:TOKEN lines; unset with no MODELYARD_TOKENS: auth off",
    )
    tokens: str = setting(
        "", "MODELYARD_TOKENS", "comma-separated NAME:ROLE:TOKEN entries (roles reader, worker, admin)"
    )
    audit_log: str = setting(
        "",
        "MODELYARD_AUDIT_LOG",
        "audit log of mutating calls: a path, '-' (stdout) or off; default DATA_DIR/audit.log",
    )
    service_token: str = setting(
        "", "MODELYARD_SERVICE_TOKEN", "bearer token this service sends when it calls another service"
    )
    ca_cert: Path | None = setting(
        None, "MODELYARD_CA_CERT", "CA trusted when this service calls another over TLS"
    )
    client_cert: Path | None = setting(
        None, "MODELYARD_CLIENT_CERT", "client certificate this service presents to mTLS servers"
    )
    client_key: Path | None = setting(None, "MODELYARD_CLIENT_KEY", "key of MODELYARD_CLIENT_CERT")

    def client_tls(self) -> TlsConfig | None:
        """TLS for this service's calls to other services (None: plaintext)."""
        return security.client_tls(self.ca_cert, self.client_cert, self.client_key)


def make_server(
    app: ServiceApp, listen: str, settings: CommonSettings, *, metrics_port: int | None = None
) -> GrpcServer:
    """A `GrpcServer` for `app` configured from the common settings (TLS, tokens, audit included).

    Prometheus metrics are served on `metrics_port` (default: the service settings'
    `metrics_port`; 0: off), on the host of `listen`.

    Raises:
        SystemExit: with one line naming the setting, when a security setting is wrong.
    """
    if metrics_port is None:
        metrics_port = int(getattr(settings, "metrics_port", 0))
    metrics_listen = f"{listen.rsplit(':', 1)[0]}:{metrics_port}" if metrics_port > 0 else None
    try:
        guard = security.server_security(
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_client_ca=settings.tls_client_ca,
            tokens_file=settings.tokens_file,
            tokens=settings.tokens,
            audit_log=settings.audit_log,
            data_dir=settings.data_dir,
        )
    except ValueError as exc:
        # A bad setting (TLS files, tokens, the audit log): one line naming it, no traceback.
        raise SystemExit(f"cannot start {', '.join(app.service_names)}: {exc}") from None
    return GrpcServer(
        app,
        listen,
        grace_seconds=settings.grace_seconds,
        drain_seconds=settings.drain_seconds,
        max_message_bytes=settings.max_message_bytes,
        credentials=guard.credentials,
        interceptors=[guard.interceptor],
        metrics_listen=metrics_listen,
    )


def serve_forever(servers: list[GrpcServer], settings: CommonSettings) -> None:
    """Configure logging and tracing, and run `servers` until SIGTERM/SIGINT."""
    logs.configure(settings.log_level, settings.log_format)
    names = [name for server in servers for name in server.app.service_names]
    tracing.configure(settings.otel_exporter, tracing.service_name_of(names))
    asyncio.run(run(servers))
