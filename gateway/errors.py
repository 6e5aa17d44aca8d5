"""The one place gRPC failures and bad requests become OpenAI errors.

Every error the gateway answers has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with an HTTP status chosen here:

- NOT_FOUND (an unknown model): 404 `NotFoundError`, code `model_not_found`;
- INVALID_ARGUMENT, OUT_OF_RANGE, a body that does not validate: 400 `BadRequestError`;
- UNIMPLEMENTED (what the model's engine cannot do, e.g. structured output on
  transformers): 400 with the service's message;
- FAILED_PRECONDITION the model causes (`MODEL_UNSUPPORTED_BY_ENGINE`, `MODEL_INCOMPATIBLE`,
  ...): 400 with the service's message;
- FAILED_PRECONDITION meaning no worker can serve now (`NO_COMPATIBLE_WORKER`, an engine
  starting or closed): 503 `ServiceUnavailableError`;
- UNAUTHENTICATED: 401 `AuthenticationError`; PERMISSION_DENIED: 403 `PermissionDeniedError`;
- RESOURCE_EXHAUSTED (back-pressure): 429 `RateLimitError`;
- UNAVAILABLE, DEADLINE_EXCEEDED: 503 `ServiceUnavailableError`;
- anything else: 500 `InternalServerError` with a generic message and the request id.

`code` is the service's reason in lower case unless said otherwise above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from clients.errors import ModelyardRpcError

log = logging.getLogger("modelyard.gateway")

UNAVAILABLE_REASONS = frozenset(
    {"NO_COMPATIBLE_WORKER", "ENGINE_NOT_STARTED", "ENGINE_CLOSED", "ENGINE_UNAVAILABLE", "NO_CATALOG"}
)
"""FAILED_PRECONDITION reasons that mean "no worker can serve this now" (503), not "bad request"."""

_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "BadRequestError"),
    grpc.StatusCode.ALREADY_EXISTS: (400, "BadRequestError"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "BadRequestError"),
    grpc.StatusCode.UNIMPLEMENTED: (400, "BadRequestError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "PermissionDeniedError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "ServiceUnavailableError"),
}


class GatewayError(Exception):
    """An error answered as OpenAI JSON: HTTP `status`, `message`, `type`, `param`, `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "BadRequestError",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """`{"error": {...}}` as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON response of this error."""
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    """A 400 about the request itself."""
    return GatewayError(400, message, type="BadRequestError", param=param, code=code)


def from_rpc_error(error: ModelyardRpcError) -> GatewayError:
    """The OpenAI error (and HTTP status) of a failed gRPC call."""
    status, kind = _BY_CODE.get(error.code, (500, "InternalServerError"))
    reason = error.reason or error.code.name
    param = error.field_violations[0][0] if error.field_violations else None
    if error.code == grpc.StatusCode.FAILED_PRECONDITION and reason in UNAVAILABLE_REASONS:
        status, kind = 503, "ServiceUnavailableError"
    if status == 500:
        request_id = error.request_id or "-"
        log.error("gateway: unexpected %s (request %s): %s", error.code.name, request_id, error)
        return _internal(request_id)
    if error.code == grpc.StatusCode.NOT_FOUND:
        code = "model_not_found" if "MODEL" in reason or reason == "NOT_FOUND" else reason.lower()
    elif error.code == grpc.StatusCode.UNAUTHENTICATED:
        code = "invalid_api_key"
    elif error.code == grpc.StatusCode.PERMISSION_DENIED:
        code = "permission_denied"
    else:
        code = reason.lower()
    message = error.message
    for name, description in error.field_violations:
        message += f"; {name}: {description}"
    return GatewayError(status, message, type=kind, param=param, code=code)


def from_validation_errors(errors: Sequence[Any]) -> GatewayError:
    """A 400 from pydantic's (FastAPI's) validation errors: the first bad field is `param`."""
    parts = []
    param = None
    for item in errors:
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        where = ".".join(location)
        if param is None and where:
            param = where
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
    return bad_request("; ".join(parts) or "invalid request body", param=param, code="invalid_request")


def internal_error(error: BaseException, request_id: str) -> GatewayError:
    """A 500 for a bug in the gateway; the traceback goes to the log only."""
    log.error("gateway: unhandled error (request %s)", request_id, exc_info=error)
    return _internal(request_id)


def _internal(request_id: str) -> GatewayError:
    """The 500 the caller sees: a generic message with the request id, the details logged."""
    return GatewayError(
        500, f"internal error (request id {request_id})", type="InternalServerError", code="internal_error"
    )
