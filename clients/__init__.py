"""Typed Python clients for Modelyard, and the `modelyard` CLI.

`CatalogClient`, `TrainerClient`, `InferenceClient` (sync) and their
`Async*` twins wrap the generated stubs with default deadlines, retries on
UNAVAILABLE only, TLS and bearer-token options, and one typed error,
`ModelyardRpcError` (code, reason, metadata, field violations).
"""

from clients.errors import ModelyardRpcError

__all__ = ["ModelyardRpcError"]
