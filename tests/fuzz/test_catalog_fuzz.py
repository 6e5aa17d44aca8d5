"""Random and malformed requests to a real catalog server: always a proper status, never INTERNAL.

One catalog (SQLite) serves the whole module. Each test draws requests with
hypothesis, sends them through raw gRPC stubs and accepts any reply or any
status but INTERNAL and UNKNOWN; afterwards the server must still answer.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import given
from hypothesis import strategies as st

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import catalog_service_pb2_grpc as pb_grpc
from modelyard.catalog.v1 import model_pb2
from tests.fuzz.conftest import FUZZ, proper_status
from tests.servers import ThreadedServer

SERVICE = "/modelyard.catalog.v1.CatalogService/"
UNARY_METHODS = [
    name
    for name, method in pb.DESCRIPTOR.services_by_name["CatalogService"].methods_by_name.items()
    if not method.server_streaming
]


class Catalog:
    """A catalog server with one READY model, a raw channel and a stub."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = ThreadedServer(
            CatalogApp(CatalogSettings(data_dir=root / "data", allowed_roots=[root]))
        )
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.CatalogServiceStub(self.channel)
        self.stub.CreateModel(
            pb.CreateModelRequest(model_id="seed", model=model_pb2.Model(display_name="seed")), timeout=30
        )

    def healthy(self) -> None:
        """The server still answers a plain read."""
        assert (
            self.stub.GetModel(pb.GetModelRequest(name="models/seed"), timeout=30).model.name == "models/seed"
        )

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    running = Catalog(tmp_path_factory.mktemp("fuzz-catalog"))
    try:
        yield running
        running.healthy()
    finally:
        running.close()


FIELDS = [
    "kind", "model_type", "architecture", "state", "tag", "labels.a", "labels", "parent", "name",
    "base_model", "weight_format", "display_name", "nope", "labels.",
]  # fmt: skip
OPERATORS = ["=", "!=", ":", "<", ">=", "==", "", " = "]
VALUES = st.one_of(
    st.sampled_from(
        ['"llm"', '"LLM"', "MODEL_KIND_LLM", '"models/*"', '"*"', '"x*y"', '""', '"', "'a'", "42"]
    ),
    st.text(max_size=20).map(lambda t: '"' + t.replace('"', "") + '"'),
    st.text(max_size=10),
)
TERMS = st.builds(lambda f, o, v: f"{f}{o}{v}", st.sampled_from(FIELDS), st.sampled_from(OPERATORS), VALUES)
FILTERS = st.one_of(
    st.lists(TERMS, max_size=4).flatmap(
        lambda terms: st.sampled_from([" AND ", " OR ", " ", " and ", "AND"]).map(lambda j: j.join(terms))
    ),
    st.text(max_size=200),
    st.sampled_from(["(", ")", "NOT", "AND", "kind = (", "-kind", 'kind="llm" AND', "\x00", "a" * 5000]),
)
TOKENS = st.one_of(
    st.text(max_size=100),
    st.binary(max_size=100).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.binary(max_size=100).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["", "=", "e30=", "eyJrIjoxfQ", "bnVsbA==", "W10=", "AAAA"]),
)
KEY_PARTS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(),
    st.text(max_size=30),
    st.text(min_size=1000, max_size=3000),
    st.lists(st.integers(), max_size=2),
)
KEY_LISTS = st.lists(KEY_PARTS, max_size=3)
"""Keys a forged page token may carry: none, several, wrong types, out of range."""


def forged_token(keys: list[object], query: str) -> str:
    """A well-formed token (version, query hash) carrying `keys`, as a forger would build it."""
    from server_kit import filtering, paging

    return paging.encode_page_token(keys, query + filtering.canonical([]))  # type: ignore[arg-type]


NAMES = st.one_of(
    st.text(max_size=60),
    st.text(max_size=40).map(lambda t: "models/" + t),
    st.sampled_from(
        ["models/seed", "models/", "models/../x", "models/seed/x", "workers/x", "models/" + "a" * 3000]
    ),
)
SHORT = st.text(max_size=40)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@st.composite
def models(draw: st.DrawFn) -> model_pb2.Model:
    """A `Model` with random values in the fields a caller may set (and some it may not)."""
    model = model_pb2.Model(
        name=draw(NAMES),
        display_name=draw(SHORT),
        description=draw(st.text(max_size=300)),
        author=draw(SHORT),
        license=draw(SHORT),
        tags=draw(st.lists(SHORT, max_size=5)),
        labels=draw(st.dictionaries(SHORT, SHORT, max_size=4)),
        parent=draw(NAMES),
        local_path=draw(st.one_of(st.text(max_size=40), st.just("/etc/passwd"), st.just("../../x"))),
        kind=model_pb2.ModelKind.ValueType(draw(st.integers(min_value=0, max_value=7))),
        state=model_pb2.ModelState.ValueType(draw(st.integers(min_value=0, max_value=6))),
        version=draw(INT32),
        size_bytes=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        etag=draw(SHORT),
    )
    for _ in range(draw(st.integers(0, 2))):
        model.files.add(path=draw(SHORT), size_bytes=draw(st.integers(-5, 2**40)), sha256=draw(SHORT))
    if draw(st.booleans()):
        llm = model.llm
        llm.architecture = draw(SHORT)
        llm.model_type = draw(SHORT)
        llm.weight_format = model_pb2.WeightFormat.ValueType(draw(st.integers(0, 9)))
        if draw(st.booleans()):
            llm.context_length = draw(st.integers(-(2**63), 2**63 - 1))
        if draw(st.booleans()):
            llm.num_layers = draw(INT32)
        if draw(st.booleans()):
            llm.default_temperature = draw(st.floats(allow_nan=True, allow_infinity=True))
    if draw(st.booleans()):
        model.source.local.path = draw(SHORT)
    return model


@FUZZ
@given(filter=FILTERS, page_token=TOKENS, page_size=INT32)
def test_list_models_with_random_filters_tokens_and_sizes(
    catalog: Catalog, filter: str, page_token: str, page_size: int
) -> None:
    request = pb.ListModelsRequest(filter=filter, page_token=page_token, page_size=page_size)
    reply = proper_status(lambda: catalog.stub.ListModels(request, timeout=30))
    if isinstance(reply, grpc.StatusCode):
        # RESOURCE_EXHAUSTED: a string over the request bounds (server_kit.security).
        assert reply in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), reply
    # Workers take the same filter and page token grammar.
    workers = pb.ListWorkersRequest(filter=filter, page_token=page_token, page_size=page_size)
    proper_status(lambda: catalog.stub.ListWorkers(workers, timeout=30))


@FUZZ
@given(keys=KEY_LISTS)
def test_list_with_forged_page_tokens(catalog: Catalog, keys: list[object]) -> None:
    for call, request in (
        (catalog.stub.ListModels, pb.ListModelsRequest(page_token=forged_token(keys, "models?"))),
        (catalog.stub.ListWorkers, pb.ListWorkersRequest(page_token=forged_token(keys, "workers?"))),
    ):
        reply = proper_status(lambda call=call, request=request: call(request, timeout=30))  # type: ignore[misc]
        if isinstance(reply, grpc.StatusCode):
            assert reply == grpc.StatusCode.INVALID_ARGUMENT, reply


@FUZZ
@given(name=NAMES, etag=SHORT, force=st.booleans())
def test_get_and_delete_random_names(catalog: Catalog, name: str, etag: str, force: bool) -> None:
    if name == "models/seed":
        etag = etag or "stale"  # the seed model stays; a stale etag is refused
    proper_status(lambda: catalog.stub.GetModel(pb.GetModelRequest(name=name), timeout=30))
    proper_status(lambda: catalog.stub.GetModelLineage(pb.GetModelLineageRequest(name=name), timeout=30))
    proper_status(lambda: catalog.stub.ResolveModel(pb.ResolveModelRequest(model=name), timeout=30))
    proper_status(lambda: catalog.stub.ValidateModel(pb.ValidateModelRequest(name=name), timeout=30))
    delete = pb.DeleteModelRequest(name=name, etag=etag, force=force)
    proper_status(lambda: catalog.stub.DeleteModel(delete, timeout=30))
    catalog.healthy()


MASK_PATHS = st.lists(
    st.one_of(
        st.sampled_from(
            ["display_name", "description", "author", "license", "tags", "labels", "parent", "name", "state",
             "llm", "llm.architecture", "labels.a", "etag", "*", "", "files"]
        ),
        st.text(max_size=20),
    ),
    max_size=5,
)  # fmt: skip


@FUZZ
@given(model=models(), paths=MASK_PATHS, on_seed=st.booleans())
def test_update_model_with_random_values_and_masks(
    catalog: Catalog, model: model_pb2.Model, paths: list[str], on_seed: bool
) -> None:
    if on_seed:
        model.name = "models/seed"
    request = pb.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=paths))
    proper_status(lambda: catalog.stub.UpdateModel(request, timeout=30))


@FUZZ
@given(
    model_id=st.one_of(st.text(max_size=70), st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)),
    model=models(),
)
def test_create_model_with_random_messages(catalog: Catalog, model_id: str, model: model_pb2.Model) -> None:
    reply = proper_status(
        lambda: catalog.stub.CreateModel(pb.CreateModelRequest(model_id=model_id, model=model))
    )
    if not isinstance(reply, grpc.StatusCode):
        # What was created reads back, and goes away again.
        name = reply.model.name
        assert catalog.stub.GetModel(pb.GetModelRequest(name=name), timeout=30).model.name == name
        proper_status(
            lambda: catalog.stub.DeleteModel(pb.DeleteModelRequest(name=name, force=True), timeout=30)
        )


@FUZZ
@given(method=st.sampled_from(UNARY_METHODS), body=st.binary(max_size=300))
def test_random_bytes_as_request_bodies(catalog: Catalog, method: str, body: bytes) -> None:
    if method in ("DeleteModel", "UpdateModel", "CreateModel", "ImportModel"):
        # Junk that parses may still be a valid mutating request: keep the seed model.
        body = body.replace(b"seed", b"sees")
    call = catalog.channel.unary_unary(SERVICE + method)
    proper_status(lambda: call(body, timeout=30))
    catalog.healthy()


@FUZZ
@given(body=st.binary(max_size=200))
def test_random_bytes_to_the_streaming_watch(catalog: Catalog, body: bytes) -> None:
    call = catalog.channel.unary_stream(SERVICE + "WatchModel")
    # A watch of an existing model would run until its deadline: a short one ends it.
    proper_status(lambda: list(call(body, timeout=0.5)))
