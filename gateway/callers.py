"""Per-caller clients: each request calls the services with its own bearer token.

The gateway holds one `AsyncCatalogClient` and one `AsyncRoutedInferenceClient` (channels,
route table, fail-over). `Services` hands each request copies of them that share those
but carry the caller's `Authorization: Bearer` token (`caller_token`), so the services'
role table answers 401/403 and the gateway never lends its own identity.
"""

from __future__ import annotations

import copy
import re
from typing import TypeVar

from fastapi import Request

from clients.base import AsyncClient
from clients.catalog import AsyncCatalogClient
from clients.inference import AsyncInferenceClient
from clients.routing import AsyncRoutedInferenceClient
from gateway.errors import GatewayError

_BEARER = re.compile(r"^\s*bearer\s+([\x21-\x7e]+)\s*$", re.IGNORECASE)

_Client = TypeVar("_Client", bound=AsyncClient)


def _with_token(client: _Client, token: str | None) -> _Client:
    """A shallow copy of `client` (same channel and stub) that calls with `token`."""
    copied = copy.copy(client)
    copied.token = token
    return copied


class _CallerRoutedClient(AsyncRoutedInferenceClient):
    """The shared routed client's routes and channels, with one caller's token on every call."""

    def __init__(self, shared: AsyncRoutedInferenceClient, catalog: AsyncCatalogClient, token: str | None):
        super().__init__(catalog, role=shared.role, refresh_seconds=shared.routes.refresh_seconds)
        self.routes = shared.routes
        self._shared = shared
        self._token = token

    def client(self, address: str) -> AsyncInferenceClient:
        if address not in self._clients:
            self._clients[address] = _with_token(self._shared.client(address), self._token)
        return self._clients[address]


class Services:
    """The clients the gateway calls the services with, per caller token."""

    def __init__(self, catalog: AsyncCatalogClient, inference: AsyncRoutedInferenceClient) -> None:
        self._catalog = catalog
        self._inference = inference

    def catalog(self, token: str | None) -> AsyncCatalogClient:
        """The catalog client, calling with `token`."""
        return _with_token(self._catalog, token)

    def inference(self, token: str | None) -> AsyncRoutedInferenceClient:
        """The routed inference client, calling with `token`."""
        return _CallerRoutedClient(self._inference, self.catalog(token), token)


def caller_token(request: Request) -> str | None:
    """The bearer token of the request; None without one; 401 for a malformed header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    match = _BEARER.match(header)
    if match is None:
        raise GatewayError(
            401,
            "the Authorization header must be 'Bearer <token>'",
            type="AuthenticationError",
            code="invalid_api_key",
        )
    return match.group(1)
