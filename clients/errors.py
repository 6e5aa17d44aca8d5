"""`ModelyardRpcError`: a failed RPC as a typed exception (like Triton's client).

Carries the status `code`, the `ErrorInfo` `reason` and `metadata`, the
`BadRequest` field violations, and the request id the server logged under.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class ModelyardRpcError(Exception):
    """A failed Modelyard RPC."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        # Messages can quote stored strings: control characters are shown escaped, so an
        # error printed to a terminal cannot drive it (see `clients.output.printable`).
        from clients.output import printable

        text = f"{self.code.name}: {printable(self.message)}"
        if self.reason:
            text += f" [{printable(self.reason)}]"
        for name, description in self.field_violations:
            text += f"\n  {printable(name)}: {printable(description)}"
        return text

    @property
    def request_id(self) -> str:
        """The request id the server logged the call under."""
        return self.metadata.get("request_id", "")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ModelyardRpcError:
        """Decode a `grpc.RpcError` (sync or aio) and its `google.rpc.Status` details."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        result = cls(code=code, message=message or "")
        status = None
        try:
            status = rpc_status.from_call(error)
        except (ValueError, AttributeError):
            status = None
        if status is None and hasattr(error, "trailing_metadata"):
            # grpc.aio errors: decode the details from the trailing metadata.
            for key, value in error.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    from google.rpc import status_pb2

                    status = status_pb2.Status.FromString(value)
        if status is None:
            return result
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result.reason = info.reason
                result.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                result.field_violations = [(v.field, v.description) for v in bad.field_violations]
        return result
