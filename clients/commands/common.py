"""What every client command shares: addresses, connection options, `--json`, clients."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from clients.catalog import CatalogClient
from clients.channel import TlsConfig
from clients.inference import InferenceClient
from clients.trainer import TrainerClient

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction


@dataclass(frozen=True)
class Service:
    """A service the CLI talks to: its flag, environment variable and default address."""

    flag: str
    env: str
    default: str


CATALOG = Service("catalog", "MODELYARD_CATALOG_ADDRESS", "localhost:50051")
TRAINER = Service("trainer", "MODELYARD_TRAINER_ADDRESS", "localhost:50052")
INFERENCE = Service("inference", "MODELYARD_INFERENCE_ADDRESS", "localhost:50053")

TOKEN_ENV = "MODELYARD_TOKEN"
CA_CERT_ENV = "MODELYARD_CA_CERT"
CLIENT_CERT_ENV = "MODELYARD_CLIENT_CERT"
CLIENT_KEY_ENV = "MODELYARD_CLIENT_KEY"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in descriptions and epilogs as written."""


def options_parser(*services: Service) -> argparse.ArgumentParser:
    """A parent parser with `--json`, the connection options and one address flag per service."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    for service in services:
        group.add_argument(
            f"--{service.flag}",
            metavar="ADDRESS",
            default=None,
            help=f"{service.flag} address host:port (default: ${service.env}, else {service.default})",
        )
    group.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    group.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="deadline of each call (default: 30 s)"
    )
    group.add_argument(
        "--ca-cert", type=Path, default=None, help=f"use TLS, trusting this CA (${CA_CERT_ENV})"
    )
    group.add_argument(
        "--client-cert", type=Path, default=None, help=f"client certificate for mTLS (${CLIENT_CERT_ENV})"
    )
    group.add_argument(
        "--client-key", type=Path, default=None, help=f"client key for mTLS (${CLIENT_KEY_ENV})"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the answer as proto JSON (camelCase, like grpcurl)"
    )
    return parser


def address(args: argparse.Namespace, service: Service) -> str:
    """The address of `service`: the flag, else the environment variable, else the default."""
    return getattr(args, service.flag, None) or os.environ.get(service.env) or service.default


def address_given(args: argparse.Namespace, service: Service) -> bool:
    """Whether the user chose `service`'s address (flag or environment), not the default."""
    return bool(getattr(args, service.flag, None) or os.environ.get(service.env))


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """TLS settings from the flags or environment; None for plaintext."""

    def path(value: Path | None, env: str) -> Path | None:
        if value is not None:
            return value
        return Path(os.environ[env]) if os.environ.get(env) else None

    ca = path(args.ca_cert, CA_CERT_ENV)
    cert = path(args.client_cert, CLIENT_CERT_ENV)
    key = path(args.client_key, CLIENT_KEY_ENV)
    if ca is None and cert is None and key is None:
        return None
    return TlsConfig(ca_cert=ca, client_cert=cert, client_key=key)


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`timeout`, `tls` and `token` for a client, from the flags and environment."""
    kwargs: dict[str, Any] = {
        "tls": tls_config(args),
        "token": args.token or os.environ.get(TOKEN_ENV) or None,
    }
    if args.timeout:
        kwargs["timeout"] = args.timeout
    return kwargs


def catalog_client(args: argparse.Namespace) -> CatalogClient:
    """A catalog client for the command."""
    return CatalogClient(address(args, CATALOG), **client_kwargs(args))


def trainer_client(args: argparse.Namespace) -> TrainerClient:
    """A trainer client for the command."""
    return TrainerClient(address(args, TRAINER), **client_kwargs(args))


def inference_client(args: argparse.Namespace) -> InferenceClient:
    """An inference client for the command (the address given, no routing)."""
    return InferenceClient(address(args, INFERENCE), **client_kwargs(args))


def local_or_as_is(value: str) -> str:
    """An existing local path as an absolute path (servers run elsewhere); anything else as is."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    return value


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """`["k=v", ...]` -> `{"k": "v"}`; ArgumentTypeError for an item without `=`."""
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, not {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def label(value: str) -> str:
    """argparse type for `KEY=VALUE`."""
    parse_labels([value])
    return value
