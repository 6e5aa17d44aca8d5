"""Domain errors and their single mapping to gRPC statuses.

Domain code raises these; `server_kit.interceptors.ErrorInterceptor` turns them
into a canonical status code with `google.rpc.Status` details: an `ErrorInfo`
(UPPER_SNAKE `reason`, `domain`, `metadata`) and, for bad input, a
`BadRequest` with one field violation per bad field. Nothing else in the
services builds a status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "modelyard.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a path such as `sampling.top_p`."""

    field: str
    description: str


class ModelyardError(Exception):
    """Base of all domain errors. Subclasses fix the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.violations = list(violations)

    def to_status(self, request_id: str = "") -> status_pb2.Status:
        """The `google.rpc.Status` this error is sent as."""
        return build_status(self.code, self.message, self.reason, self.metadata, self.violations, request_id)


class InvalidArgument(ModelyardError):
    """Bad input: the request itself is wrong (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ModelyardError):
    """A named resource does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ModelyardError):
    """A resource with that name exists (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ModelyardError):
    """The system is not in a state that allows the call (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(ModelyardError):
    """A concurrency conflict, e.g. an etag mismatch (ABORTED)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class OutOfRange(ModelyardError):
    """A value past a valid range, e.g. a prompt longer than the context (OUT_OF_RANGE)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(ModelyardError):
    """Back-pressure: too many requests at once (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(ModelyardError):
    """No or invalid credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ModelyardError):
    """Valid credentials without the right to do this (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unavailable(ModelyardError):
    """A dependency (database, engine, another service) is down (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unimplemented(ModelyardError):
    """The RPC or option is not implemented (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    violations: Iterable[FieldViolation] = (),
    request_id: str = "",
) -> status_pb2.Status:
    """A `google.rpc.Status` with ErrorInfo (and BadRequest when there are violations)."""
    info_metadata = dict(metadata or {})
    if request_id:
        info_metadata["request_id"] = request_id
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=info_metadata))
    details.append(info)
    violations = list(violations)
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in violations
                ]
            )
        )
        details.append(bad)
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
