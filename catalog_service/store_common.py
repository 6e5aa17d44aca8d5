"""What the catalog's store modules share: names, limits, checks and filter helpers.

`store.CatalogStore` (models) and `worker_store.WorkerStore` (workers, mixed into
`CatalogStore`) use these; other modules import the public names from here or from
`catalog_service.store`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import ColumnElement, not_

from modelyard.catalog.v1 import model_pb2
from server_kit import filtering
from server_kit.errors import FieldViolation, InvalidArgument
from server_kit.filtering import Term, filter_error
from server_kit.security import check_stored_strings

ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_PREFIX = "models/"
WORKER_PREFIX = "workers/"

MODEL_FILTER_FIELDS = (
    "name",
    "kind",
    "model_type",
    "family",
    "architecture",
    "state",
    "weight_format",
    "base_model",
    "parent",
    "tag",
    "tags",
    "labels.*",
)
WORKER_FILTER_FIELDS = ("name", "role", "engine", "state")
UPDATABLE_MODEL_PATHS = ("display_name", "description", "author", "license", "tags", "labels", "parent")
UNFINISHED_STATES = (model_pb2.MODEL_STATE_IMPORTING, model_pb2.MODEL_STATE_VALIDATING)

MAX_TAG_CHARS = 256
MAX_LABEL_KEY_CHARS = 256
MAX_LABEL_VALUE_CHARS = 256
MAX_INDEXED_BYTES = 2048
MAX_SOURCE_KEY_BYTES = 1024
MAX_STRING_BYTES = 4096
"""Default bound of every string stored in a model or worker (names, paths, messages, ...)."""
STRING_LIMITS: dict[str, int] = {"description": 64 * 1024, "chat_template": 256 * 1024, "message": 16 * 1024}
"""Larger bounds of the few fields that hold free text, by field name."""
MAX_MODEL_BYTES = 4 * 1024 * 1024
"""Bound of one stored model (its serialized proto: mostly its file list)."""
MAX_WORKER_BYTES = 256 * 1024
"""Bound of one stored worker (capabilities, loaded models)."""
WORKER_RETENTION_TTLS = 10
"""An expired worker's row is swept this many heartbeat TTLs after its last heartbeat."""

CONFIG_KINDS = {
    "llm": model_pb2.MODEL_KIND_LLM,
    "image": model_pb2.MODEL_KIND_IMAGE,
    "audio": model_pb2.MODEL_KIND_AUDIO,
    "video": model_pb2.MODEL_KIND_VIDEO,
}

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_etag() -> str:
    return secrets.token_hex(8)


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None)


def source_column(source_key: str) -> str:
    """`source_key` as stored: long keys are replaced by their hash to stay indexable."""
    if len(source_key.encode()) <= MAX_SOURCE_KEY_BYTES:
        return source_key
    return "sha256:" + hashlib.sha256(source_key.encode()).hexdigest()


def check_enum(enum: Any, value: int, field: str) -> None:
    """Refuse an enum number the proto does not define (a newer client's, or junk)."""
    if value not in enum.values():
        raise InvalidArgument(
            f"{field} {value} is not a known {enum.DESCRIPTOR.name}",
            reason="UNKNOWN_ENUM_VALUE",
            violations=[FieldViolation(field, f"not a {enum.DESCRIPTOR.name} value")],
        )


def check_id(value: str, what: str, field: str) -> None:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            f"{what} id {value!r} is invalid: use 1-63 lowercase letters, digits and hyphens, "
            "starting with a letter and not ending with a hyphen",
            reason=f"INVALID_{what.upper()}_ID",
            metadata={field: value},
            violations=[FieldViolation(field, "must match ^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")],
        )


def check_bytes(field: str, value: str, limit: int) -> None:
    if len(value) * 4 <= limit:
        return  # at most 4 UTF-8 bytes a character: no need to encode
    if len(value.encode()) > limit:
        raise InvalidArgument(
            f"{field} is too long ({len(value.encode())} bytes; at most {limit})",
            reason="VALUE_TOO_LONG",
            violations=[FieldViolation(field, f"at most {limit} bytes")],
        )


def check_strings(message: Message, prefix: str, total_limit: int) -> None:
    """Every string of `message` within its bound, the whole message within `total_limit`."""
    check_stored_strings(
        message, prefix, total_limit=total_limit, default_limit=MAX_STRING_BYTES, limits=STRING_LIMITS
    )


def model_id_of(name: str) -> str:
    """`models/x` or `x` → `x`."""
    return name.removeprefix(MODEL_PREFIX)


def worker_id_of(name: str) -> str:
    """`workers/x` or `x` → `x`."""
    return name.removeprefix(WORKER_PREFIX)


def enum_value(enum_type: Any, prefix: str, field: str, text: str) -> str:
    """The full enum value name for `READY` / `ready` / `MODEL_STATE_READY`; InvalidArgument if none."""
    names = list(enum_type.keys())
    upper = text.upper()
    for candidate in (upper, prefix + upper):
        if candidate in names:
            return str(candidate)
    short = [name.removeprefix(prefix) for name in names if not name.endswith("_UNSPECIFIED")]
    raise filter_error(f"{field} has no value {text!r}; use one of {', '.join(short)}")


def like_prefix(column: Any, value: str) -> ColumnElement[bool]:
    """`column LIKE 'value%'` with LIKE wildcards in `value` escaped."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped + "%", escape="\\")


def string_match(column: Any, term: Term) -> ColumnElement[bool]:
    """Equality, or a prefix match for a value ending in `*`; `field:*` means non-empty."""
    if term.op == filtering.HAS and term.value == "*":
        return column != ""
    if term.value.endswith("*"):
        return like_prefix(column, term.value[:-1])
    return column == term.value


def negate(term: Term, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    return not_(condition) if term.op == filtering.NE else condition
