"""Server interceptors: request ids, logging, and the one error mapping.

`ErrorInterceptor` wraps every handler of a server. It assigns the RPC a
request id (the caller's `x-request-id` metadata, else a new one), makes it
available to logs, and turns exceptions into statuses:

- `ModelyardError` -> its canonical code, message and `google.rpc.Status`
  details (ErrorInfo with reason and request id; BadRequest for bad fields);
- `NotImplementedError` (the generated base servicer's default) -> UNIMPLEMENTED;
- anything else -> INTERNAL with a generic message and the request id; the
  stack trace goes to the log, never to the client.

A request body that is not a valid protobuf message is answered
INVALID_ARGUMENT (reason MALFORMED_REQUEST): gRPC itself would send UNKNOWN. The
body is parsed leniently by the `ErrorInterceptor` and refused by
`MalformedRequestInterceptor`, the innermost one: authentication (the
`SecurityInterceptor`, between them) answers first, so a caller without a valid
token gets UNAUTHENTICATED whatever bytes it sends.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from server_kit import errors
from server_kit.logs import request_id_var

log = logging.getLogger("modelyard.rpc")

REQUEST_ID_KEY = "x-request-id"


def _request_id(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:128]
    return uuid.uuid4().hex


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse; the handler wrapper refuses it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning a `_MalformedRequest` instead of raising on bad bytes."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return _MalformedRequest(exc)

    return deserialize


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, _MalformedRequest):
        raise errors.InvalidArgument(
            f"the request is not a valid protobuf message: {request.error}", reason="MALFORMED_REQUEST"
        )


def status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, Any]:
    """The code and `google.rpc.Status` an exception is sent as."""
    if isinstance(exc, errors.ModelyardError):
        return exc.code, exc.to_status(request_id)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, errors.build_status(
            grpc.StatusCode.UNIMPLEMENTED,
            "this RPC is not implemented yet",
            "NOT_IMPLEMENTED",
            request_id=request_id,
        )
    return grpc.StatusCode.INTERNAL, errors.build_status(
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id})",
        "INTERNAL",
        request_id=request_id,
    )


async def _abort(context: aio.ServicerContext, exc: BaseException, request_id: str, method: str) -> None:
    code, status = status_of(exc, request_id)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s %s", method, code.name, getattr(exc, "reason", ""))
    await context.abort(
        code,
        status.message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            (REQUEST_ID_KEY, request_id),
        ),
    )


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps domain errors to statuses and tags each RPC with a request id."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                request_id = _request_id(context)
                token = request_id_var.set(request_id)
                started = time.perf_counter()
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    log.debug("%s ok in %.1f ms", method, (time.perf_counter() - started) * 1e3)
                    return result
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, request_id, method)
                finally:
                    request_id_var.reset(token)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            deserializer = (
                handler.request_deserializer
                if handler.stream_unary
                else _lenient(handler.request_deserializer)
            )
            return make(unary, deserializer, handler.response_serializer)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            request_id = _request_id(context)
            token = request_id_var.set(request_id)
            try:
                result = inner_stream(request, context)
                if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result
                else:
                    for item in result:
                        yield item
            except aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, request_id, method)
            finally:
                # A stream the client closed early is finalized in another context.
                with contextlib.suppress(ValueError):
                    request_id_var.reset(token)

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        stream_deserializer = (
            handler.request_deserializer if handler.stream_stream else _lenient(handler.request_deserializer)
        )
        return make_stream(stream, stream_deserializer, handler.response_serializer)


class MalformedRequestInterceptor(aio.ServerInterceptor):
    """Refuses a request whose bytes did not parse (`MALFORMED_REQUEST`); goes innermost.

    It runs after every other interceptor (authentication included), right before the
    servicer, which therefore only ever sees parsed messages.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.stream_unary or handler.stream_stream:
            return handler  # request streams are parsed by gRPC itself
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                _refuse_malformed(request)
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            _refuse_malformed(request)
            result = inner_stream(request, context)
            if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result
            else:
                for item in result:
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
