"""Routing: which worker serves a model, and fail-over when a worker disappears.

The catalog's `FindWorkers` answers with the healthy compatible workers, best
first, and the rejected ones with the rules they fail. `ranked_matches` turns
that answer into the workers to try, or raises `NoCompatibleWorker` saying why
each worker was rejected.

`RoutedInferenceClient` (and its asyncio twin) sends each request to the best
worker for the model and, when that worker is UNAVAILABLE (stopped, crashed,
unreachable), tries the next one; when every known worker failed it asks the
catalog again once. Only UNAVAILABLE fails over: any other error is the
worker's answer. A stream fails over only before its first message arrives;
an error after that is raised (the text already received cannot be undone).
`embed` asks `FindWorkers` for the workers that can embed the model
(`embeddings`), cached apart from the generation routes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from clients.catalog import AsyncCatalogClient, CatalogClient, model_name
from clients.errors import ModelyardRpcError
from clients.inference import (
    AsyncInferenceClient,
    ChatMessageLike,
    InferenceClient,
    Prompt,
)
from modelyard.catalog.v1 import catalog_service_pb2, worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb

T = TypeVar("T")

REASON_NO_COMPATIBLE_WORKER = "NO_COMPATIBLE_WORKER"
DEFAULT_REFRESH_SECONDS = 10.0


def _short(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def role_label(role: worker_pb2.WorkerRole.ValueType) -> str:
    """`WORKER_ROLE_INFERENCE` -> `inference`; `any` for unspecified."""
    if role == worker_pb2.WORKER_ROLE_UNSPECIFIED:
        return "any"
    return _short(worker_pb2.WorkerRole.Name(role), "WORKER_ROLE_").lower()


def rejection_lines(rejected: Sequence[catalog_service_pb2.WorkerMatch]) -> list[str]:
    """One line per rejected worker: its name, engine, state and each failing rule's message."""
    lines = []
    for match in rejected:
        worker = match.worker
        name = worker.name or match.report.worker or "(unnamed worker)"
        engine = worker.capabilities.engine or match.report.engine
        head = f"{name} ({engine})" if engine else name
        reasons = [
            f"{result.rule}: {result.message}"
            for result in match.report.results
            if result.outcome == worker_pb2.RULE_OUTCOME_FAIL
        ]
        if not reasons and worker.state not in (
            worker_pb2.WORKER_STATE_HEALTHY,
            worker_pb2.WORKER_STATE_UNSPECIFIED,
        ):
            reasons.append(
                f"worker_state: {_short(worker_pb2.WorkerState.Name(worker.state), 'WORKER_STATE_')}"
            )
        if not worker.address and not reasons:
            reasons.append("the worker has no address")
        lines.append(f"{head}: {'; '.join(reasons) or 'rejected'}")
    return lines


class NoCompatibleWorker(ModelyardRpcError):
    """No healthy worker can run the model: FAILED_PRECONDITION, reason NO_COMPATIBLE_WORKER.

    `rejected` holds the catalog's reports; the message lists each rejected
    worker with the messages of the rules it fails.
    """

    def __init__(
        self,
        model: str,
        role: worker_pb2.WorkerRole.ValueType,
        rejected: Sequence[catalog_service_pb2.WorkerMatch] = (),
    ) -> None:
        label = role_label(role)
        what = "worker" if label == "any" else f"{label} worker"
        lines = rejection_lines(rejected)
        if lines:
            message = f"no {what} can run {model_name(model)}:\n" + "\n".join(f"  {line}" for line in lines)
        else:
            message = f"no {what} can run {model_name(model)}: no {what} is registered with the catalog"
        super().__init__(
            code=grpc.StatusCode.FAILED_PRECONDITION,
            message=message,
            reason=REASON_NO_COMPATIBLE_WORKER,
            metadata={"model": model_name(model), "role": label},
        )
        self.rejected = list(rejected)


def ranked_matches(
    response: catalog_service_pb2.FindWorkersResponse,
    model: str,
    role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_UNSPECIFIED,
) -> list[catalog_service_pb2.WorkerMatch]:
    """The matches to try, best first (those with an address); `NoCompatibleWorker` when none."""
    usable = [match for match in response.matches if match.worker.address]
    if not usable:
        without_address = [match for match in response.matches if not match.worker.address]
        raise NoCompatibleWorker(model, role, [*without_address, *response.rejected])
    return usable


class RouteTable:
    """Ranked worker addresses per routing key, kept for `refresh_seconds`.

    Plain bookkeeping, no I/O: the routed clients fill it from `FindWorkers`
    and drop an address when its worker turns out to be unavailable.
    """

    MAX_ROUTES = 1024
    """Most keys kept: keys are request-supplied model names, so the table is bounded."""

    def __init__(self, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        self.refresh_seconds = refresh_seconds
        self._routes: dict[str, tuple[float, list[str]]] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, key: str, now: float | None = None) -> list[str] | None:
        """The cached addresses for `key`, or None when missing, stale or emptied."""
        entry = self._routes.get(key)
        now = time.monotonic() if now is None else now
        if entry is None or now - entry[0] > self.refresh_seconds or not entry[1]:
            return None
        return list(entry[1])

    def put(self, key: str, addresses: Sequence[str], now: float | None = None) -> None:
        """Remember `addresses` (best first) for `key`; stale routes go first when the table is full."""
        now = time.monotonic() if now is None else now
        self._routes.pop(key, None)
        if len(self._routes) >= self.MAX_ROUTES:
            for stale in [k for k, (at, _) in self._routes.items() if now - at > self.refresh_seconds]:
                del self._routes[stale]
            while len(self._routes) >= self.MAX_ROUTES:  # oldest first (insertion order)
                del self._routes[next(iter(self._routes))]
        self._routes[key] = (now, list(addresses))

    def forget(self, key: str, address: str) -> None:
        """Drop `address` from the route of `key` (its worker did not answer)."""
        entry = self._routes.get(key)
        if entry is not None and address in entry[1]:
            entry[1].remove(address)


def _route_key(model: str, adapter: str | None) -> str:
    # A request with an adapter is routed by the adapter: its rules include its base's.
    return model_name(adapter) if adapter else model_name(model)


def _embed_key(key: str) -> str:
    # Embed is routed apart (FindWorkers with `embeddings`): not every worker can embed.
    return f"embed {key}"


def _is_unavailable(error: ModelyardRpcError) -> bool:
    return error.code == grpc.StatusCode.UNAVAILABLE


_EMPTY: Any = object()


class RoutedInferenceClient:
    """Inference through the catalog's routing, with fail-over on UNAVAILABLE.

    ```python
    with RoutedInferenceClient(catalog="localhost:50051") as client:
        reply = client.generate("tiny-llama", "Hello", max_tokens=8)
    ```

    `client_kwargs` (`timeout`, `tls`, `token`) apply to every worker's client
    and, when `catalog` is an address, to the catalog client too.
    """

    def __init__(
        self,
        catalog: CatalogClient | str,
        *,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        **client_kwargs: Any,
    ) -> None:
        self._owns_catalog = isinstance(catalog, str)
        self.catalog = (
            CatalogClient(catalog, token=client_kwargs.get("token"), tls=client_kwargs.get("tls"))
            if isinstance(catalog, str)
            else catalog
        )
        self.role = role
        self.routes = RouteTable(refresh_seconds)
        self._client_kwargs = client_kwargs
        self._clients: dict[str, InferenceClient] = {}
        self.last_address: str | None = None
        """Address of the worker that answered the last request."""

    def addresses(self, model: str, *, refresh: bool = False, embeddings: bool = False) -> list[str]:
        """Worker addresses for `model`, best first (cached; `refresh` asks the catalog;
        `embeddings`: the workers that can embed it, cached apart)."""
        key = model_name(model)
        cache_key = _embed_key(key) if embeddings else key
        cached = None if refresh else self.routes.get(cache_key)
        if cached is not None:
            return cached
        response = self.catalog.find_workers(key, self.role, embeddings=embeddings)
        matches = ranked_matches(response, key, self.role)
        addresses = [match.worker.address for match in matches]
        self.routes.put(cache_key, addresses)
        return addresses

    def client(self, address: str) -> InferenceClient:
        """The (cached) client of the worker at `address`."""
        if address not in self._clients:
            self._clients[address] = InferenceClient(address, **self._client_kwargs)
        return self._clients[address]

    def _run(self, key: str, call: Callable[[InferenceClient], T], *, embeddings: bool = False) -> T:
        tried: set[str] = set()
        last_error: ModelyardRpcError | None = None
        for refresh in (False, True):
            for address in self.addresses(key, refresh=refresh, embeddings=embeddings):
                if address in tried:
                    continue
                tried.add(address)
                try:
                    result = call(self.client(address))
                except ModelyardRpcError as error:
                    if not _is_unavailable(error):
                        raise
                    last_error = error
                    self.routes.forget(_embed_key(key) if embeddings else key, address)
                    continue
                self.last_address = address
                return result
        assert last_error is not None
        raise last_error

    def _stream(self, key: str, open_stream: Callable[[InferenceClient], Iterator[T]]) -> Iterator[T]:
        def start(client: InferenceClient) -> tuple[Iterator[T], T]:
            iterator = open_stream(client)
            return iterator, next(iterator, _EMPTY)

        iterator, head = self._run(key, start)
        try:
            if head is not _EMPTY:
                yield head
                yield from iterator
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def generate(
        self, model: str, prompt: Prompt, *, adapter: str | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        """`InferenceClient.generate` on the best worker for the model (or adapter)."""
        return self._run(
            _route_key(model, adapter), lambda c: c.generate(model, prompt, adapter=adapter, **kwargs)
        )

    def stream_generate(
        self, model: str, prompt: Prompt, *, adapter: str | None = None, **kwargs: Any
    ) -> Iterator[pb.StreamGenerateResponse]:
        """`InferenceClient.stream_generate` on the best worker; fails over before the first delta."""
        return self._stream(
            _route_key(model, adapter), lambda c: c.stream_generate(model, prompt, adapter=adapter, **kwargs)
        )

    def chat(
        self, model: str, messages: Sequence[ChatMessageLike], *, adapter: str | None = None, **kwargs: Any
    ) -> pb.ChatResponse:
        """`InferenceClient.chat` on the best worker for the model (or adapter)."""
        return self._run(
            _route_key(model, adapter), lambda c: c.chat(model, messages, adapter=adapter, **kwargs)
        )

    def stream_chat(
        self, model: str, messages: Sequence[ChatMessageLike], *, adapter: str | None = None, **kwargs: Any
    ) -> Iterator[pb.StreamChatResponse]:
        """`InferenceClient.stream_chat` on the best worker; fails over before the first delta."""
        return self._stream(
            _route_key(model, adapter), lambda c: c.stream_chat(model, messages, adapter=adapter, **kwargs)
        )

    def embed(self, model: str, inputs: Sequence[str], **kwargs: Any) -> pb.EmbedResponse:
        """`InferenceClient.embed` on the best worker that can embed the model."""
        return self._run(model_name(model), lambda c: c.embed(model, inputs, **kwargs), embeddings=True)

    def load_model(self, model: str, *, max_model_len: int | None = None) -> pb.LoadedModel:
        """Load `model` on the best worker for it."""
        return self._run(model_name(model), lambda c: c.load_model(model, max_model_len=max_model_len))

    def close(self) -> None:
        """Close every worker client (and the catalog client when this object opened it)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._owns_catalog:
            self.catalog.close()

    def __enter__(self) -> RoutedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRoutedInferenceClient:
    """asyncio twin of `RoutedInferenceClient`."""

    def __init__(
        self,
        catalog: AsyncCatalogClient | str,
        *,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        **client_kwargs: Any,
    ) -> None:
        self._owns_catalog = isinstance(catalog, str)
        self.catalog = (
            AsyncCatalogClient(catalog, token=client_kwargs.get("token"), tls=client_kwargs.get("tls"))
            if isinstance(catalog, str)
            else catalog
        )
        self.role = role
        self.routes = RouteTable(refresh_seconds)
        self._client_kwargs = client_kwargs
        self._clients: dict[str, AsyncInferenceClient] = {}
        self.last_address: str | None = None

    async def addresses(self, model: str, *, refresh: bool = False, embeddings: bool = False) -> list[str]:
        """Worker addresses for `model`, best first (cached; `refresh` asks the catalog;
        `embeddings`: the workers that can embed it, cached apart)."""
        key = model_name(model)
        cache_key = _embed_key(key) if embeddings else key
        cached = None if refresh else self.routes.get(cache_key)
        if cached is not None:
            return cached
        response = await self.catalog.find_workers(key, self.role, embeddings=embeddings)
        matches = ranked_matches(response, key, self.role)
        addresses = [match.worker.address for match in matches]
        self.routes.put(cache_key, addresses)
        return addresses

    def client(self, address: str) -> AsyncInferenceClient:
        """The (cached) client of the worker at `address`."""
        if address not in self._clients:
            self._clients[address] = AsyncInferenceClient(address, **self._client_kwargs)
        return self._clients[address]

    async def _run(
        self, key: str, call: Callable[[AsyncInferenceClient], Awaitable[T]], *, embeddings: bool = False
    ) -> T:
        tried: set[str] = set()
        last_error: ModelyardRpcError | None = None
        for refresh in (False, True):
            for address in await self.addresses(key, refresh=refresh, embeddings=embeddings):
                if address in tried:
                    continue
                tried.add(address)
                try:
                    result = await call(self.client(address))
                except ModelyardRpcError as error:
                    if not _is_unavailable(error):
                        raise
                    last_error = error
                    self.routes.forget(_embed_key(key) if embeddings else key, address)
                    continue
                self.last_address = address
                return result
        assert last_error is not None
        raise last_error

    async def _stream(
        self, key: str, open_stream: Callable[[AsyncInferenceClient], AsyncIterator[T]]
    ) -> AsyncIterator[T]:
        async def start(client: AsyncInferenceClient) -> tuple[AsyncIterator[T], T]:
            iterator = open_stream(client)
            return iterator, await anext(iterator, _EMPTY)

        iterator, head = await self._run(key, start)
        try:
            if head is not _EMPTY:
                yield head
                async for item in iterator:
                    yield item
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    async def generate(
        self, model: str, prompt: Prompt, *, adapter: str | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        """`AsyncInferenceClient.generate` on the best worker for the model (or adapter)."""
        return await self._run(
            _route_key(model, adapter), lambda c: c.generate(model, prompt, adapter=adapter, **kwargs)
        )

    def stream_generate(
        self, model: str, prompt: Prompt, *, adapter: str | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        """`AsyncInferenceClient.stream_generate` on the best worker; fails over before the first delta."""
        return self._stream(
            _route_key(model, adapter), lambda c: c.stream_generate(model, prompt, adapter=adapter, **kwargs)
        )

    async def chat(
        self, model: str, messages: Sequence[ChatMessageLike], *, adapter: str | None = None, **kwargs: Any
    ) -> pb.ChatResponse:
        """`AsyncInferenceClient.chat` on the best worker for the model (or adapter)."""
        return await self._run(
            _route_key(model, adapter), lambda c: c.chat(model, messages, adapter=adapter, **kwargs)
        )

    def stream_chat(
        self, model: str, messages: Sequence[ChatMessageLike], *, adapter: str | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.StreamChatResponse]:
        """`AsyncInferenceClient.stream_chat` on the best worker; fails over before the first delta."""
        return self._stream(
            _route_key(model, adapter), lambda c: c.stream_chat(model, messages, adapter=adapter, **kwargs)
        )

    async def embed(self, model: str, inputs: Sequence[str], **kwargs: Any) -> pb.EmbedResponse:
        """`AsyncInferenceClient.embed` on the best worker that can embed the model."""
        return await self._run(model_name(model), lambda c: c.embed(model, inputs, **kwargs), embeddings=True)

    async def load_model(self, model: str, *, max_model_len: int | None = None) -> pb.LoadedModel:
        """Load `model` on the best worker for it."""
        return await self._run(model_name(model), lambda c: c.load_model(model, max_model_len=max_model_len))

    async def close(self) -> None:
        """Close every worker client (and the catalog client when this object opened it)."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self._owns_catalog:
            await self.catalog.close()

    async def __aenter__(self) -> AsyncRoutedInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "REASON_NO_COMPATIBLE_WORKER",
    "AsyncRoutedInferenceClient",
    "NoCompatibleWorker",
    "RouteTable",
    "RoutedInferenceClient",
    "ranked_matches",
    "rejection_lines",
    "role_label",
]
