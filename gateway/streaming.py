"""Server-sent events over a gRPC stream, as OpenAI streams its completions.

A route awaits the stream's first item (`first`) before it answers, so a request that
fails before generating gets its real HTTP status. `event_stream` then sends the chunks
of each item (built by `gateway.translate`) as `data: {json}` events, an error after the
first item as an error event (the status is sent already), the chunks of the end, and
`data: [DONE]`. The gRPC stream is closed however the response ends, which cancels the
RPC, and the request in the engine, when the client goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from clients.errors import ModelyardRpcError
from gateway import errors

DONE = "data: [DONE]\n\n"
EMPTY: Any = object()
"""What `first` answers for a stream that ended without an item."""

Chunks = Callable[[Any], list[dict[str, Any]]]
"""The chunks of one stream item, or of the end (None)."""


def sse(data: Mapping[str, Any]) -> str:
    """One server-sent event carrying `data` as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def first(stream: AsyncIterator[Any]) -> Any:
    """The first item of `stream` (`EMPTY` at once for an empty one); errors raised here."""
    return await anext(stream, EMPTY)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class _EventStream(StreamingResponse):
    """Server-sent events that close their gRPC stream however the response ends.

    The events' own `finally` closes it once they start; this covers a client gone
    before the first event was sent (the generator never started).
    """

    def __init__(self, events: AsyncIterator[str], stream: AsyncIterator[Any]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._stream)


def event_stream(
    head: Any,
    stream: AsyncIterator[Any],
    chunks: Chunks,
    *,
    on_start: Callable[[], None],
) -> StreamingResponse:
    """The SSE response of `stream`, whose first item (`head`) has arrived.

    `on_start` is called when the response starts sending (time to first token).
    """

    async def events() -> AsyncIterator[str]:
        on_start()
        try:
            if head is not EMPTY:
                for data in chunks(head):
                    yield sse(data)
                async for item in stream:
                    for data in chunks(item):
                        yield sse(data)
        except ModelyardRpcError as error:  # after the first delta: the status is sent already
            yield sse(errors.from_rpc_error(error).body())
        finally:
            await _close(stream)  # cancels the RPC when the client went away
        for data in chunks(None):
            yield sse(data)
        yield DONE

    return _EventStream(events(), stream)
