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
import math
from collections.abc import Iterable, Sequence

from server_kit.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 4 * 1024 * 1024
"""Most bytes of entries one page carries (far below the gRPC message limit): a page ends
at `page_size` entries or at this many bytes, whichever comes first (at least one entry)."""
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


def fit_page(sizes: Iterable[int], page_size: int, budget: int = MAX_PAGE_BYTES) -> tuple[int, bool]:
    """How many leading entries of sizes `sizes` make the page, and whether more follow.

    At most `page_size` entries and `budget` bytes, but always at least one entry (a
    single entry is bounded where it is stored). `sizes` may hold one entry more than
    `page_size` (the usual `LIMIT n + 1` probe for a next page).
    """
    used = 0
    count = 0
    for size in sizes:
        if count == page_size or (count and used + size > budget):
            return count, True
        used += size
        count += 1
    return count, False


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


MAX_KEY_CHARS = 1024
"""Longest string key part a token may carry (ids are far shorter)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _valid_part(part: object, kind: type) -> bool:
    if kind is int:
        return isinstance(part, int) and not isinstance(part, bool) and INT64_MIN <= part <= INT64_MAX
    if kind is str:
        return isinstance(part, str) and 0 < len(part) <= MAX_KEY_CHARS and "\x00" not in part
    if kind is float:
        return isinstance(part, int | float) and not isinstance(part, bool) and math.isfinite(part)
    return False


def decode_page_token(token: str, query: str = "", *, kinds: Sequence[type] = (str,)) -> list[KeyPart] | None:
    """The last key a token carries, or None for an empty token (first page).

    Args:
        token: the `page_token` of the request.
        query: the query the token must have been issued for.
        kinds: the type of each key part, in order (`str`, `int` or `float`): a token is
            valid only with exactly these parts, ints within 64 bits, strings non-empty
            and at most `MAX_KEY_CHARS` long, floats finite.

    Raises InvalidArgument (reason INVALID_PAGE_TOKEN) for a token that does not
    parse, carries a key of the wrong shape, type or range, or was issued for another
    query.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise _token_error("page_token is not a token this service issued") from exc
    if (
        not isinstance(payload, dict)
        or payload.get("v") != _VERSION
        or not isinstance(payload.get("k"), list)
        or len(payload["k"]) != len(kinds)
        or not all(_valid_part(part, kind) for part, kind in zip(payload["k"], kinds, strict=True))
    ):
        raise _token_error("page_token is not a token this service issued")
    if payload.get("q") != _query_hash(query):
        raise _token_error(
            "page_token was issued for another filter; repeat the request with the same filter "
            "or start again without a page_token"
        )
    return list(payload["k"])
