"""Page sizes and opaque page tokens for keyset pagination (AIP-158).

A page token carries the sort key of the last item of the page it ends, so the
next page is `WHERE key > last ORDER BY key LIMIT n + 1`: stable under inserts
and deletes, and as cheap on the thousandth page as on the first (no OFFSET).
It also carries a hash of the query (the filter) it was issued for; a token
used with another filter is refused, as AIP-158 asks.

Tokens are URL-safe base64 of a small JSON document. They are opaque to
clients, not secret: a forged token can only move the starting key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from server_kit.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_VERSION = 1

KeyPart = str | int | float


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The effective page size: 0 means `default`, above `maximum` is clamped, negative is refused."""
    if value < 0:
        raise InvalidArgument(
            f"page_size must not be negative (got {value})",
            reason="INVALID_PAGE_SIZE",
            violations=[FieldViolation("page_size", "must be 0 (server default) or a positive number")],
        )
    if value == 0:
        return default
    return min(value, maximum)


def _query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def encode_page_token(last_key: Sequence[KeyPart], query: str = "") -> str:
    """A token for the page that starts after `last_key`, valid only with `query`."""
    payload = {"v": _VERSION, "k": list(last_key), "q": _query_hash(query)}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _token_error(message: str) -> InvalidArgument:
    return InvalidArgument(
        message, reason="INVALID_PAGE_TOKEN", violations=[FieldViolation("page_token", message)]
    )


def decode_page_token(token: str, query: str = "") -> list[KeyPart] | None:
    """The last key a token carries, or None for an empty token (first page).

    Raises InvalidArgument (reason INVALID_PAGE_TOKEN) for a token that does not
    parse or was issued for another query.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise _token_error("page_token is not a token this service issued") from exc
    if (
        not isinstance(payload, dict)
        or payload.get("v") != _VERSION
        or not isinstance(payload.get("k"), list)
        or not all(isinstance(part, str | int | float) for part in payload["k"])
    ):
        raise _token_error("page_token is not a token this service issued")
    if payload.get("q") != _query_hash(query):
        raise _token_error(
            "page_token was issued for another filter; repeat the request with the same filter "
            "or start again without a page_token"
        )
    return list(payload["k"])
