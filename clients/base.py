"""Base classes of the typed clients: one stub, default deadlines, typed errors.

Each service client declares its RPCs once, as request builders plus a
function that picks the answer out of the response; `SyncClient` and
`AsyncClient` run them on a sync or an asyncio channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc import aio

from clients.channel import DEFAULT_TIMEOUT, TlsConfig, call_metadata, open_aio_channel, open_channel
from clients.errors import ModelyardRpcError

T = TypeVar("T")


def _identity(response: Any) -> Any:
    return response


class SyncClient:
    """A blocking client over one channel. Use as a context manager or call `close()`."""

    SERVICE: str = ""
    STUB: Callable[[Any], Any]

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsConfig | None = None,
        token: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.token = token
        self._channel = channel or open_channel(address, self.SERVICE, tls)
        self._stub = type(self).STUB(self._channel)

    def call(
        self, method: str, request: Any, pick: Callable[[Any], T] = _identity, *, timeout: float | None = None
    ) -> T:
        """Call unary RPC `method`; raise `ModelyardRpcError` on failure."""
        try:
            response = getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=call_metadata(self.token)
            )
        except grpc.RpcError as error:
            raise ModelyardRpcError.from_rpc_error(error) from None
        return pick(response)

    def stream(self, method: str, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Iterate a server-streaming RPC; `timeout` None means no deadline."""
        responses = getattr(self._stub, method)(request, timeout=timeout, metadata=call_metadata(self.token))
        try:
            yield from responses
        except grpc.RpcError as error:
            raise ModelyardRpcError.from_rpc_error(error) from None
        finally:
            responses.cancel()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """An asyncio client over one channel. Use with `async with` or `await close()`."""

    SERVICE: str = ""
    STUB: Callable[[Any], Any]

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsConfig | None = None,
        token: str | None = None,
        channel: aio.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.token = token
        self._channel = channel or open_aio_channel(address, self.SERVICE, tls)
        self._stub = type(self).STUB(self._channel)

    async def call(
        self, method: str, request: Any, pick: Callable[[Any], T] = _identity, *, timeout: float | None = None
    ) -> T:
        """Call unary RPC `method`; raise `ModelyardRpcError` on failure."""
        try:
            response = await getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=call_metadata(self.token)
            )
        except grpc.RpcError as error:
            raise ModelyardRpcError.from_rpc_error(error) from None
        return pick(response)

    async def stream(self, method: str, request: Any, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """Iterate a server-streaming RPC; leaving the loop early cancels the RPC."""
        call = getattr(self._stub, method)(request, timeout=timeout, metadata=call_metadata(self.token))
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise ModelyardRpcError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
