"""TLS, bearer-token authentication with roles, request bounds and the audit hook.

Every server built by `server_kit.common.make_server` gets its security from
the settings:

- **TLS**: `server_credentials()` from `MODELYARD_TLS_CERT` and
  `MODELYARD_TLS_KEY`; with `MODELYARD_TLS_CLIENT_CA` the server also requires
  a client certificate signed by that CA (mTLS). Without a certificate the
  server is plaintext and says so in a warning when it starts.
- **Tokens**: `MODELYARD_TOKENS_FILE` and/or `MODELYARD_TOKENS` name the callers:
  entries `NAME:ROLE:TOKEN` (or `NAME:ROLE:sha256:HEX`, the token's SHA-256),
  one per line in the file, comma-separated in the variable. Only the SHA-256
  of each token is kept in memory; a presented token is hashed and compared
  with every entry in constant time. Without entries authentication is off
  (the embedded default), which the server says in a warning when it starts.
- **Roles**: `reader` may call every read RPC and generate text; `worker` may
  also register, heartbeat and deregister workers and report engine outcomes;
  `admin` may call everything.
  `METHOD_ROLES` lists the role each RPC needs; an RPC missing from it needs
  `admin` (fail closed). Health and reflection need no token (probes, grpcurl).
- **Bounds**: top-level string fields of a request are bounded by name
  (resource names and ids, filters, page tokens, paths); a longer value is
  INVALID_ARGUMENT (`VALUE_TOO_LONG`). Whole messages are bounded by
  `MODELYARD_MAX_MESSAGE_BYTES` in gRPC itself (RESOURCE_EXHAUSTED).
- **Audit**: calls of RPCs that need `worker` or `admin` go to the
  `server_kit.audit.AuditLog`, refused ones included.

`SecurityInterceptor` must sit inside `server_kit.interceptors.ErrorInterceptor`
(which `GrpcServer` puts first): it raises `server_kit.errors` types, and the
ErrorInterceptor turns them into UNAUTHENTICATED, PERMISSION_DENIED or
INVALID_ARGUMENT with their details. Tokens never reach a log line, an error
message or the audit log.

`python -m server_kit.security token NAME ROLE` prints a new random token and
the tokens-file line that holds only its hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc import aio

from clients.channel import TlsConfig
from server_kit import errors
from server_kit.audit import AuditEntry, AuditLog
from server_kit.interceptors import status_of
from server_kit.logs import request_id_var

log = logging.getLogger("modelyard.security")

READER = "reader"
WORKER = "worker"
ADMIN = "admin"

ROLE_GRANTS: Mapping[str, frozenset[str]] = {
    READER: frozenset({READER}),
    WORKER: frozenset({READER, WORKER}),
    ADMIN: frozenset({READER, WORKER, ADMIN}),
}
"""What each role may do: a role is granted the RPCs that need any role in its set."""

OPEN = ""
"""The 'role' of RPCs anyone may call, with or without a token."""

_CATALOG = "/modelyard.catalog.v1.CatalogService/"
_TRAINER = "/modelyard.trainer.v1.TrainerService/"
_INFERENCE = "/modelyard.inference.v1.InferenceService/"

METHOD_ROLES: Mapping[str, str] = {
    # Catalog: models.
    _CATALOG + "CreateModel": ADMIN,
    _CATALOG + "ImportModel": ADMIN,
    _CATALOG + "GetModel": READER,
    _CATALOG + "ListModels": READER,
    _CATALOG + "UpdateModel": ADMIN,
    _CATALOG + "DeleteModel": ADMIN,
    _CATALOG + "ValidateModel": READER,
    _CATALOG + "WatchModel": READER,
    _CATALOG + "GetModelLineage": READER,
    _CATALOG + "DetectModelType": READER,
    _CATALOG + "ResolveModel": READER,
    # Catalog: workers. Only workers (and admins) may announce where traffic goes.
    _CATALOG + "RegisterWorker": WORKER,
    _CATALOG + "Heartbeat": WORKER,
    _CATALOG + "DeregisterWorker": WORKER,
    # Workers report what their engines did with a model; it steers routing (the `observed` rule).
    _CATALOG + "ReportEngineOutcome": WORKER,
    _CATALOG + "GetWorker": READER,
    _CATALOG + "ListWorkers": READER,
    # Catalog: routing.
    _CATALOG + "CheckCompatibility": READER,
    _CATALOG + "FindWorkers": READER,
    # Trainer.
    _TRAINER + "CreateTrainingJob": ADMIN,
    _TRAINER + "GetTrainingJob": READER,
    _TRAINER + "ListTrainingJobs": READER,
    _TRAINER + "CancelTrainingJob": ADMIN,
    _TRAINER + "WatchTrainingJob": READER,
    _TRAINER + "ValidateDataset": READER,
    _TRAINER + "ListTrainingMetrics": READER,
    _TRAINER + "MergeAdapter": ADMIN,  # registers a new catalog model
    _TRAINER + "ExportModel": ADMIN,  # registers a new catalog model
    # Inference: generating is using a model, not changing the platform.
    _INFERENCE + "Generate": READER,
    _INFERENCE + "StreamGenerate": READER,
    _INFERENCE + "Chat": READER,
    _INFERENCE + "StreamChat": READER,
    _INFERENCE + "GenerateImage": READER,
    _INFERENCE + "Embed": READER,
    _INFERENCE + "LoadModel": ADMIN,
    _INFERENCE + "UnloadModel": ADMIN,
    _INFERENCE + "ListLoadedModels": READER,
    _INFERENCE + "GetServerInfo": READER,
}
"""The role each RPC needs (full method path → role). RPCs not listed need ADMIN."""

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Services anyone may call: health (probes) and reflection (the API's shape, no data)."""

UNAUDITED_WHEN_OK = frozenset({_CATALOG + "Heartbeat"})
"""Mutating RPCs whose successful calls are not audited (a heartbeat every few seconds per worker)."""

MIN_TOKEN_CHARS = 16
"""Shortest token accepted in the configuration (`secrets.token_urlsafe(32)` gives 43)."""

NAME_FIELD_BYTES = 1024
FILTER_BYTES = 2048
PAGE_TOKEN_BYTES = 2048
PATH_BYTES = 4096

FIELD_LIMITS: Mapping[str, int] = {
    **{
        name: NAME_FIELD_BYTES
        for name in (
            "name",
            "model",
            "worker",
            "adapter",
            "parent",
            "base_model",
            "model_id",
            "worker_id",
            "job_id",
            "training_job",
            "etag",
            "request_id",
        )
    },
    "filter": FILTER_BYTES,
    "page_token": PAGE_TOKEN_BYTES,
    "source": PATH_BYTES,
    "path": PATH_BYTES,
}
"""Most UTF-8 bytes of a top-level string field of any request, by field name."""

_AUTHORIZATION = "authorization"
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def required_role(method: str) -> str:
    """The role `method` (`/package.Service/Method`) needs; `OPEN` for health and reflection."""
    if method.startswith(OPEN_SERVICES):
        return OPEN
    return METHOD_ROLES.get(method, ADMIN)


def is_mutating(method: str) -> bool:
    """Whether `method` changes state (needs more than `reader`); these calls are audited."""
    role = required_role(method)
    return role not in (OPEN, READER)


# ------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class TokenEntry:
    """One configured caller: a name (for logs and the audit), a role, the SHA-256 of its token."""

    name: str
    role: str
    digest: bytes

    def __repr__(self) -> str:
        return f"TokenEntry(name={self.name!r}, role={self.role!r})"


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token, as kept in memory and in `sha256:` entries."""
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, where: str, *, separator: str = "\n") -> list[TokenEntry]:
    """Entries `NAME:ROLE:TOKEN` or `NAME:ROLE:sha256:HEX` from `text` ('#' starts a comment).

    Raises ValueError naming `where` and the entry's position (never the token).
    """
    entries: list[TokenEntry] = []
    for number, raw in enumerate(text.split(separator), start=1):
        line = raw.split("#", 1)[0].strip() if separator == "\n" else raw.strip()
        if not line:
            continue
        at = f"{where}, entry {number}"
        parts = line.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{at}: expected NAME:ROLE:TOKEN")
        name, role, secret = (part.strip() for part in parts)
        if not _TOKEN_NAME.match(name):
            raise ValueError(f"{at}: name must be 1-128 letters, digits, '.', '_', '@' or '-'")
        if role not in ROLE_GRANTS:
            raise ValueError(f"{at} ({name}): unknown role {role!r}; use one of {', '.join(ROLE_GRANTS)}")
        if secret.startswith("sha256:"):
            hexdigest = secret.removeprefix("sha256:").lower()
            if not _HEX64.match(hexdigest):
                raise ValueError(f"{at} ({name}): sha256: must be followed by 64 hex digits")
            digest = bytes.fromhex(hexdigest)
        else:
            if len(secret) < MIN_TOKEN_CHARS or any(c.isspace() for c in secret):
                raise ValueError(
                    f"{at} ({name}): a token needs at least {MIN_TOKEN_CHARS} characters and no spaces "
                    "(make one with `python -m server_kit.security token NAME ROLE`)"
                )
            digest = token_digest(secret)
        entries.append(TokenEntry(name, role, digest))
    return entries


def load_tokens(tokens_file: Path | None, tokens: str) -> list[TokenEntry]:
    """The entries of `MODELYARD_TOKENS_FILE` and `MODELYARD_TOKENS` together (names must be unique)."""
    entries: list[TokenEntry] = []
    if tokens_file is not None:
        try:
            text = Path(tokens_file).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"MODELYARD_TOKENS_FILE: cannot read {tokens_file}: {exc.strerror}") from None
        entries += parse_tokens(text, f"MODELYARD_TOKENS_FILE {tokens_file}")
    if tokens.strip():
        entries += parse_tokens(tokens, "MODELYARD_TOKENS", separator=",")
    seen: set[str] = set()
    digests: set[bytes] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"token name {entry.name!r} is configured twice")
        if entry.digest in digests:
            raise ValueError(f"token of {entry.name!r} is also another name's token")
        seen.add(entry.name)
        digests.add(entry.digest)
    return entries


class Authenticator:
    """Finds the configured caller a bearer token belongs to, in constant time per entry."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = list(entries)

    def identify(self, token: str) -> TokenEntry | None:
        """The entry whose token is `token`, or None. Every entry is compared, match or not."""
        digest = token_digest(token)
        found: TokenEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the `authorization: Bearer <token>` metadata; '' when malformed; None when absent."""
    for key, value in metadata or ():
        if key == _AUTHORIZATION:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            match = _BEARER.match(text)
            return match.group(1) if match else ""
    return None


# --------------------------------------------------------------------------------------- TLS


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; None (plaintext) when no certificate is configured.

    With `client_ca` the server requires a client certificate signed by it (mTLS).
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("MODELYARD_TLS_CLIENT_CA needs MODELYARD_TLS_CERT and MODELYARD_TLS_KEY")
        return None
    if cert is None or key is None:
        raise ValueError("set both MODELYARD_TLS_CERT and MODELYARD_TLS_KEY (or neither)")
    pair = (_read(key, "MODELYARD_TLS_KEY"), _read(cert, "MODELYARD_TLS_CERT"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(client_ca, "MODELYARD_TLS_CLIENT_CA"), require_client_auth=True
    )


def client_tls(
    ca_cert: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> TlsConfig | None:
    """TLS for a service's own calls to other services; None (plaintext) when nothing is set."""
    if ca_cert is None and client_cert is None and client_key is None:
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("set both MODELYARD_CLIENT_CERT and MODELYARD_CLIENT_KEY (or neither)")
    for path, setting in ((ca_cert, "MODELYARD_CA_CERT"), (client_cert, "MODELYARD_CLIENT_CERT")):
        if path is not None:
            _read(path, setting)  # fail at start, not at the first call
    return TlsConfig(ca_cert=ca_cert, client_cert=client_cert, client_key=client_key)


# ------------------------------------------------------------------------------------ bounds


_limits_cache: dict[str, list[tuple[str, int]]] = {}


def _string_limits(descriptor: Any) -> list[tuple[str, int]]:
    limits = _limits_cache.get(descriptor.full_name)
    if limits is None:
        limits = [
            (field.name, FIELD_LIMITS[field.name])
            for field in descriptor.fields
            if field.type == FieldDescriptor.TYPE_STRING
            and field.name in FIELD_LIMITS
            and not field.is_repeated
        ]
        _limits_cache[descriptor.full_name] = limits
    return limits


def check_bounds(request: Any) -> None:
    """Raise INVALID_ARGUMENT (`VALUE_TOO_LONG`) when a bounded top-level string field is too long."""
    if not isinstance(request, Message):
        return
    for name, limit in _string_limits(request.DESCRIPTOR):
        value: str = getattr(request, name)
        if len(value) <= limit // 4:
            continue  # at most 4 UTF-8 bytes a character
        size = len(value.encode())
        if size > limit:
            raise errors.InvalidArgument(
                f"{name} is too long ({size} bytes; at most {limit})",
                reason="VALUE_TOO_LONG",
                metadata={"field": name, "limit": limit},
                violations=[errors.FieldViolation(name, f"at most {limit} bytes")],
            )


def check_stored_strings(
    message: Message,
    prefix: str,
    *,
    total_limit: int,
    default_limit: int = 4096,
    limits: Mapping[str, int] | None = None,
) -> None:
    """Refuse (`VALUE_TOO_LONG`, naming the field) a message about to be stored with a string
    over its bound (`limits` by field name, else `default_limit`), nested fields, repeated
    fields and maps included, or with more than `total_limit` bytes in all.

    Everything a server stores is bounded this way, so no entry can make a listing
    exceed the gRPC message limit.
    """
    size = message.ByteSize()
    if size > total_limit:
        raise errors.InvalidArgument(
            f"{prefix} is too large ({size} bytes; at most {total_limit})",
            reason="VALUE_TOO_LONG",
            violations=[errors.FieldViolation(prefix, f"at most {total_limit} bytes in all")],
        )
    _walk_strings(message, prefix, default_limit, limits or {})


def _check_length(path: str, value: str, limit: int) -> None:
    if len(value) * 4 <= limit:
        return  # at most 4 UTF-8 bytes a character
    size = len(value.encode())
    if size > limit:
        raise errors.InvalidArgument(
            f"{path} is too long ({size} bytes; at most {limit})",
            reason="VALUE_TOO_LONG",
            metadata={"field": path[:200], "limit": limit},
            violations=[errors.FieldViolation(path[:200], f"at most {limit} bytes")],
        )


def _walk_strings(message: Message, prefix: str, default: int, limits: Mapping[str, int]) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}.{field.name}"
        limit = limits.get(field.name, default)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(key, str):
                        _check_length(f"{path} key", key, default)
                    if isinstance(item, str):
                        _check_length(f"{path}[{str(key)[:40]}]", item, limit)
                    elif isinstance(item, Message):
                        _walk_strings(item, f"{path}[{str(key)[:40]}]", default, limits)
            elif field.is_repeated:
                for index, item in enumerate(value):
                    _walk_strings(item, f"{path}[{index}]", default, limits)
            else:
                _walk_strings(value, path, default, limits)
        elif field.type == FieldDescriptor.TYPE_STRING:
            for item in value if field.is_repeated else [value]:
                _check_length(path, item, limit)


# -------------------------------------------------------------------------------- interceptor


@dataclass(frozen=True)
class Caller:
    """Who made a call: the name and role of its token (`anonymous` when authentication is off)."""

    name: str
    role: str


ANONYMOUS = Caller("anonymous", "")


def _cert_subject(context: aio.ServicerContext) -> str:
    try:
        values = context.auth_context().get("x509_subject") or []
    except Exception:  # no transport security
        return ""
    return values[0].decode(errors="replace") if values else ""


def _field(message: Message, name: str) -> Any:
    """Field `name` of `message`, or None when the message has no such field."""
    return getattr(message, name) if name in message.DESCRIPTOR.fields_by_name else None


def _resource_of(request: Any, response: Any = None) -> str:
    """The resource a mutating call named: from the response when it made one, else the request."""
    for holder in (response, request):
        if not isinstance(holder, Message):
            continue
        for name in ("model", "job", "worker", "loaded_model"):
            value = _field(holder, name)
            if isinstance(value, Message):
                value = _field(value, "name") or _field(value, "model")
            if isinstance(value, str) and value:
                return value
        if _field(holder, "name"):
            return str(_field(holder, "name"))
        for name, prefix in (("model_id", "models/"), ("worker_id", "workers/"), ("job_id", "trainingJobs/")):
            if _field(holder, name):
                return prefix + str(_field(holder, name))
    return ""


class SecurityInterceptor(aio.ServerInterceptor):
    """Authenticates and authorizes each call, bounds its strings, and audits mutating calls.

    `authenticator` None means authentication is off: every caller may call
    every RPC (and the audit names the certificate subject or `anonymous`).
    """

    def __init__(self, authenticator: Authenticator | None, audit: AuditLog | None = None) -> None:
        self.authenticator = authenticator
        self.audit = audit

    def log_status(self, address: str) -> None:
        """Say at start-up how this server authenticates and audits."""
        if self.authenticator is None:
            log.warning(
                "authentication is OFF on %s: no tokens configured (MODELYARD_TOKENS_FILE, "
                "MODELYARD_TOKENS), every caller may call every RPC",
                address,
            )
        else:
            roles = sorted({entry.role for entry in self.authenticator.entries})
            log.info(
                "bearer tokens required on %s: %d token(s), roles %s",
                address,
                len(self.authenticator.entries),
                ", ".join(roles),
            )
        if self.audit is None:
            log.warning("the audit log is off (MODELYARD_AUDIT_LOG=off)")
        else:
            log.info("audit log of mutating calls: %s", self.audit.where)

    def _identify(self, context: aio.ServicerContext) -> Caller:
        """The caller of a guarded RPC, or raise Unauthenticated."""
        if self.authenticator is None:
            return ANONYMOUS
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise errors.Unauthenticated(
                "this RPC needs a bearer token: send `authorization: Bearer <token>` metadata "
                "(the CLI's --token or MODELYARD_TOKEN, grpcurl -H 'authorization: Bearer ...')",
                reason="MISSING_CREDENTIALS",
            )
        if not token:
            raise errors.Unauthenticated(
                "malformed authorization metadata: expected `Bearer <token>`", reason="MALFORMED_CREDENTIALS"
            )
        entry = self.authenticator.identify(token)
        if entry is None:
            raise errors.Unauthenticated("the bearer token is not valid here", reason="INVALID_TOKEN")
        return Caller(entry.name, entry.role)

    def _authorize(self, method: str, role_needed: str, caller: Caller) -> None:
        """Raise PermissionDenied unless `caller`'s role grants `role_needed`."""
        if self.authenticator is None or role_needed in ROLE_GRANTS[caller.role]:
            return
        short = method.rsplit("/", 1)[-1]
        raise errors.PermissionDenied(
            f"{caller.name} (role {caller.role}) may not call {short}: it needs the {role_needed} role",
            reason="ROLE_NOT_ALLOWED",
            metadata={"method": short, "required_role": role_needed, "role": caller.role},
        )

    def _audit(
        self,
        method: str,
        caller: Caller | None,
        context: aio.ServicerContext,
        request: Any,
        response: Any,
        code: grpc.StatusCode,
        reason: str,
        started: float,
    ) -> None:
        assert self.audit is not None
        if code == grpc.StatusCode.OK and method in UNAUDITED_WHEN_OK:
            return
        _, service, name = method.split("/", 2)
        caller = caller or Caller("", "")
        extra: dict[str, str] = {}
        if name == "ImportModel" and isinstance(request, Message) and _field(request, "source"):
            extra["source"] = str(_field(request, "source"))[:PATH_BYTES]
        self.audit.write(
            AuditEntry(
                service=service,
                method=name,
                resource=_resource_of(request, response)[:NAME_FIELD_BYTES],
                code=code.name,
                reason=reason,
                principal=caller.name,
                role=caller.role,
                cert_subject=_cert_subject(context),
                peer=context.peer() or "",
                request_id=request_id_var.get(),
                duration_ms=round((time.perf_counter() - started) * 1e3, 1),
                extra=extra,
            )
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        role_needed = required_role(method)
        if role_needed == OPEN:
            return handler
        audited = self.audit is not None and is_mutating(method)

        def outcome(exc: BaseException, context: aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
            if isinstance(exc, asyncio.CancelledError):
                return grpc.StatusCode.CANCELLED, ""
            if isinstance(exc, aio.AbortError):
                code = context.code() if hasattr(context, "code") else None
                return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), ""
            code, _ = status_of(exc, "")
            return code, getattr(exc, "reason", "")

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                started = time.perf_counter()
                caller: Caller | None = None
                try:
                    caller = self._identify(context)
                    self._authorize(method, role_needed, caller)
                    check_bounds(request)
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                except BaseException as exc:
                    if audited:
                        code, reason = outcome(exc, context)
                        self._audit(method, caller, context, request, None, code, reason, started)
                    raise
                if audited:
                    self._audit(method, caller, context, request, result, grpc.StatusCode.OK, "", started)
                return result

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return make(unary, handler.request_deserializer, handler.response_serializer)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            caller: Caller | None = None
            try:
                caller = self._identify(context)
                self._authorize(method, role_needed, caller)
                check_bounds(request)
                result = inner_stream(request, context)
                if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result
                else:
                    for item in result:
                        yield item
            except BaseException as exc:
                if audited and not isinstance(exc, GeneratorExit):
                    code, reason = outcome(exc, context)
                    self._audit(method, caller, context, request, None, code, reason, started)
                raise
            if audited:
                self._audit(method, caller, context, request, None, grpc.StatusCode.OK, "", started)

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(stream, handler.request_deserializer, handler.response_serializer)


# ----------------------------------------------------------------------------- from settings


@dataclass(frozen=True)
class ServerSecurity:
    """What `make_server` adds to a server: TLS credentials (None: plaintext) and the interceptor."""

    credentials: grpc.ServerCredentials | None
    interceptor: SecurityInterceptor


def server_security(
    *,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    tokens_file: Path | None,
    tokens: str,
    audit_log: str,
    data_dir: Path,
) -> ServerSecurity:
    """Build a server's security from its settings; ValueError names a bad setting."""
    credentials = server_credentials(tls_cert, tls_key, tls_client_ca)
    entries = load_tokens(tokens_file, tokens)
    authenticator = Authenticator(entries) if entries else None
    audit = AuditLog.from_setting(audit_log, data_dir)
    return ServerSecurity(credentials, SecurityInterceptor(authenticator, audit))


def main(argv: list[str] | None = None) -> int:
    """`python -m server_kit.security token NAME ROLE`: a new token and its tokens-file line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "token" or args[2] not in ROLE_GRANTS or not _TOKEN_NAME.match(args[1]):
        print(f"usage: python -m server_kit.security token NAME {{{','.join(ROLE_GRANTS)}}}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    print(f"token (give it to the caller; shown once): {token}")
    print(f"tokens-file line (keeps only the hash):   {args[1]}:{args[2]}:sha256:{token_digest(token).hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
