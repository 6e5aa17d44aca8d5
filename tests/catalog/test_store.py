"""The catalog store on SQLite and PostgreSQL: what the catalog's RPCs rely on.

Every test taking `store` or `db_url` runs on both backends (see conftest.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from catalog_service import db
from catalog_service.store import CatalogStore
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import filtering, paging
from server_kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ModelyardError,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from tests.catalog.conftest import FakeClock


def llm(
    architecture: str = "LlamaForCausalLM",
    model_type: str = "llama",
    *,
    weight_format: int = model_pb2.WEIGHT_FORMAT_SAFETENSORS,
    state: int = model_pb2.MODEL_STATE_READY,
    **fields: Any,
) -> model_pb2.Model:
    """An LLM entry as the import flow would describe it."""
    model = model_pb2.Model(state=state, **fields)  # type: ignore[arg-type]
    model.llm.architecture = architecture
    model.llm.model_type = model_type
    model.llm.weight_format = weight_format  # type: ignore[assignment]
    return model


def names(models: list[model_pb2.Model]) -> list[str]:
    return [m.name.removeprefix("models/") for m in models]


def raises(error_type: type[ModelyardError], reason: str, call: Callable[[], object]) -> ModelyardError:
    """Run `call`, assert it raises `error_type` with `reason`, return the error."""
    with pytest.raises(error_type) as caught:
        call()
    assert caught.value.reason == reason, caught.value.message
    return caught.value


# --------------------------------------------------------------------------- create / get


def test_create_sets_identity_times_etag_and_get_returns_it(store: CatalogStore, clock: FakeClock) -> None:
    given = llm(display_name="Tiny Llama", author="acme", tags=["chat"], labels={"team": "nlp"})
    created = store.create_model("tiny-llama", given)

    assert created.name == "models/tiny-llama"
    assert created.kind == model_pb2.MODEL_KIND_LLM  # derived from the llm config
    assert created.version == 1
    assert created.etag
    assert created.create_time.ToDatetime().replace(tzinfo=None) == clock.now.replace(tzinfo=None)
    assert created.update_time == created.create_time
    assert given.name == ""  # the caller's message is not modified
    assert store.get_model("tiny-llama") == created
    assert store.get_model("models/tiny-llama") == created


@pytest.mark.parametrize("bad_id", ["", "Llama", "1llama", "llama-", "llama_2", "a" * 64, "models/x"])
def test_create_refuses_invalid_ids(store: CatalogStore, bad_id: str) -> None:
    error = raises(InvalidArgument, "INVALID_MODEL_ID", lambda: store.create_model(bad_id, llm()))
    assert [v.field for v in error.violations] == ["model_id"]
    assert store.list_models()[0] == []


def test_create_duplicate_id_is_already_exists_and_keeps_the_original(store: CatalogStore) -> None:
    original = store.create_model("dup", llm(display_name="first"))
    error = raises(
        AlreadyExists, "MODEL_ALREADY_EXISTS", lambda: store.create_model("dup", llm(display_name="second"))
    )
    assert error.metadata == {"model": "models/dup"}
    assert store.get_model("dup") == original


def test_create_with_unknown_parent_is_refused_and_stores_nothing(store: CatalogStore) -> None:
    error = raises(
        FailedPrecondition, "PARENT_NOT_FOUND", lambda: store.create_model("child", llm(parent="models/nope"))
    )
    assert error.metadata == {"parent": "models/nope"}
    raises(NotFound, "MODEL_NOT_FOUND", lambda: store.get_model("child"))


def test_create_refuses_kind_contradicting_config(store: CatalogStore) -> None:
    raises(
        InvalidArgument,
        "KIND_MISMATCH",
        lambda: store.create_model("odd", llm(kind=model_pb2.MODEL_KIND_IMAGE)),
    )


def test_get_missing_model_is_not_found_with_metadata(store: CatalogStore) -> None:
    error = raises(NotFound, "MODEL_NOT_FOUND", lambda: store.get_model("models/missing"))
    assert error.metadata == {"model": "models/missing"}


def test_concurrent_creates_of_one_id_have_exactly_one_winner(store: CatalogStore) -> None:
    threads_count = 6
    barrier = threading.Barrier(threads_count)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(index: int) -> None:
        barrier.wait()
        try:
            store.create_model("contested", llm(display_name=f"writer {index}"))
            outcome = "created"
        except AlreadyExists:
            outcome = "exists"
        except Exception as error:  # recorded: anything else fails the test below
            outcome = f"{type(error).__name__}: {error}"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["created"] + ["exists"] * (threads_count - 1)
    assert names(store.list_models()[0]) == ["contested"]


def test_concurrent_creates_of_different_ids_all_succeed(store: CatalogStore) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def create(index: int) -> None:
        barrier.wait()
        try:
            store.create_model(f"model-{index}", llm(tags=["t"], labels={"i": str(index)}))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_models(filter="tag = t")[0]) == 6


# --------------------------------------------------------------------------- filters


@pytest.fixture
def populated(store: CatalogStore) -> CatalogStore:
    """Five entries covering every filter field."""
    store.create_model("llama-a", llm(tags=["chat"], labels={"team": "nlp"}))
    store.create_model(
        "qwen-b",
        llm(
            "Qwen2ForCausalLM",
            "qwen2",
            state=model_pb2.MODEL_STATE_VALIDATING,
            tags=["chat", "small"],
            labels={"team": "vision"},
        ),
    )
    store.create_model("gguf-c", llm(weight_format=model_pb2.WEIGHT_FORMAT_GGUF))
    sdxl = model_pb2.Model(state=model_pb2.MODEL_STATE_READY, labels={"team": "nlp"})
    sdxl.image.pipeline_class = "StableDiffusionXLPipeline"
    sdxl.image.base_model = model_pb2.IMAGE_BASE_MODEL_SDXL
    sdxl.image.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
    store.create_model("sdxl-d", sdxl)
    adapter = llm(parent="llama-a")
    adapter.llm.adapter.base_model = "models/llama-a"
    store.create_model("adapter-e", adapter)
    return store


FILTER_CASES: list[tuple[str, list[str]]] = [
    ("", ["adapter-e", "gguf-c", "llama-a", "qwen-b", "sdxl-d"]),
    ("kind = LLM", ["adapter-e", "gguf-c", "llama-a", "qwen-b"]),
    ('kind = "MODEL_KIND_IMAGE"', ["sdxl-d"]),
    ("kind != llm", ["sdxl-d"]),
    ('model_type = "llama"', ["adapter-e", "gguf-c", "llama-a"]),
    ("family = qwen2", ["qwen-b"]),
    ("architecture = StableDiffusionXLPipeline", ["sdxl-d"]),
    ("architecture = Qwen*", ["qwen-b"]),
    ("state = READY", ["adapter-e", "gguf-c", "llama-a", "sdxl-d"]),
    ("state = MODEL_STATE_VALIDATING", ["qwen-b"]),
    ("weight_format = GGUF", ["gguf-c"]),
    ("tag = chat", ["llama-a", "qwen-b"]),
    ("tags:small", ["qwen-b"]),
    ("tag != chat", ["adapter-e", "gguf-c", "sdxl-d"]),
    ("labels.team = nlp", ["llama-a", "sdxl-d"]),
    ("labels.team:*", ["llama-a", "qwen-b", "sdxl-d"]),
    ("labels.team != nlp", ["adapter-e", "gguf-c", "qwen-b"]),
    ("labels.zone = eu", []),
    ("parent = models/llama-a", ["adapter-e"]),
    ("parent = llama-a", ["adapter-e"]),
    ('parent = ""', ["gguf-c", "llama-a", "qwen-b", "sdxl-d"]),
    ("parent:*", ["adapter-e"]),
    ("parent != llama-a", ["gguf-c", "llama-a", "qwen-b", "sdxl-d"]),
    ('name = "llama*"', ["llama-a"]),
    ("name = models/qwen-b", ["qwen-b"]),
    ('name = "models/s*"', ["sdxl-d"]),
    ('name = "llama_*"', []),  # `_` is literal, not a LIKE wildcard
    ("base_model = SDXL", ["sdxl-d"]),
    ("base_model = llama-a", ["adapter-e"]),
    ("kind = LLM AND state = READY AND tag = chat", ["llama-a"]),
    ("labels.team = nlp AND kind = IMAGE", ["sdxl-d"]),
]


def test_list_filters(populated: CatalogStore) -> None:
    """Each field, negations, prefixes, presence and AND (all cases on one populated store)."""
    wrong = {}
    for filter_text, expected in FILTER_CASES:
        models, token = populated.list_models(filter=filter_text)
        if names(models) != expected or token:
            wrong[filter_text] = (names(models), "expected", expected)
    assert wrong == {}


def test_unknown_filter_field_is_invalid_filter_listing_allowed_fields(populated: CatalogStore) -> None:
    error = raises(InvalidArgument, "INVALID_FILTER", lambda: populated.list_models(filter="colour = red"))
    assert "colour" in error.message
    assert "architecture" in error.message and "labels.*" in error.message
    assert [v.field for v in error.violations] == ["filter"]


MALFORMED_FILTERS = [
    "state = DONE",
    "kind = TEXT",
    "weight_format = onnx",
    "state = READY OR kind = LLM",
    "(state = READY)",
    "NOT state = READY",
    "state > READY",
    'name = "unterminated',
    "state = READY AND",
    "state READY",
]


def test_malformed_filters_are_invalid_filter(populated: CatalogStore) -> None:
    accepted = []
    for filter_text in MALFORMED_FILTERS:
        try:
            populated.list_models(filter=filter_text)
            accepted.append(filter_text)
        except InvalidArgument as error:
            assert error.reason == "INVALID_FILTER", (filter_text, error.reason)
            assert [v.field for v in error.violations] == ["filter"]
    assert accepted == []


def test_bad_enum_value_error_lists_the_accepted_values(populated: CatalogStore) -> None:
    error = raises(InvalidArgument, "INVALID_FILTER", lambda: populated.list_models(filter="state = DONE"))
    assert "READY" in error.message and "IMPORTING" in error.message


def test_filter_values_are_bound_never_sql(populated: CatalogStore) -> None:
    models, _ = populated.list_models(filter="name = \"x' OR '1'='1\"")
    assert models == []
    assert len(populated.list_models()[0]) == 5


def test_filter_parser_handles_quotes_escapes_and_paths() -> None:
    terms = filtering.parse_filter(
        r'labels.app.kubernetes.io/name = "a \"quoted\" value" AND tag:x AND state!=READY',
        ["labels.*", "tag", "state"],
    )
    assert terms == [
        filtering.Term("labels.app.kubernetes.io/name", "=", 'a "quoted" value', quoted=True),
        filtering.Term("tag", ":", "x"),
        filtering.Term("state", "!=", "READY"),
    ]
    assert filtering.parse_filter("   ", ["x"]) == []


# --------------------------------------------------------------------------- paging


def test_paging_walks_every_entry_once_in_order(store: CatalogStore) -> None:
    for index in range(25):
        store.create_model(f"m-{index:02d}", llm(tags=["even" if index % 2 == 0 else "odd"]))

    seen: list[str] = []
    token = ""
    page_lengths = []
    while True:
        models, token = store.list_models(page_size=10, page_token=token)
        page_lengths.append(len(models))
        seen.extend(names(models))
        if not token:
            break
    assert page_lengths == [10, 10, 5]
    assert seen == [f"m-{i:02d}" for i in range(25)]

    evens: list[str] = []
    token = ""
    while True:
        models, token = store.list_models(page_size=4, page_token=token, filter="tag = even")
        evens.extend(names(models))
        if not token:
            break
    assert evens == [f"m-{i:02d}" for i in range(0, 25, 2)]


def test_paging_is_stable_when_entries_change_between_pages(store: CatalogStore) -> None:
    for index in range(6):
        store.create_model(f"m-{index}", llm())
    first, token = store.list_models(page_size=3)
    store.create_model("m-0a", llm())  # sorts before the cursor: not on later pages
    store.create_model("m-9", llm())  # after the cursor: on a later page
    store.delete_model("m-4")
    rest, token = store.list_models(page_size=3, page_token=token)
    assert names(first) == ["m-0", "m-1", "m-2"]
    assert names(rest) == ["m-3", "m-5", "m-9"]
    assert token == ""


def test_page_size_defaults_clamps_and_refuses_negative(store: CatalogStore) -> None:
    for index in range(3):
        store.create_model(f"m-{index}", llm())
    assert len(store.list_models(page_size=0)[0]) == 3
    error = raises(InvalidArgument, "INVALID_PAGE_SIZE", lambda: store.list_models(page_size=-1))
    assert [v.field for v in error.violations] == ["page_size"]
    assert paging.page_size(0) == 50
    assert paging.page_size(5000) == 1000


def test_page_token_is_bound_to_its_filter(store: CatalogStore) -> None:
    for index in range(4):
        store.create_model(f"m-{index}", llm(tags=["t"]))
    _, token = store.list_models(page_size=2, filter="tag = t")
    assert token
    # The same filter written differently is the same query.
    assert names(store.list_models(page_size=2, page_token=token, filter="tag=t")[0]) == ["m-2", "m-3"]
    error = raises(
        InvalidArgument,
        "INVALID_PAGE_TOKEN",
        lambda: store.list_models(page_size=2, page_token=token, filter="state = READY"),
    )
    assert [v.field for v in error.violations] == ["page_token"]
    raises(InvalidArgument, "INVALID_PAGE_TOKEN", lambda: store.list_models(page_token="not-a-token!"))
    raises(InvalidArgument, "INVALID_PAGE_TOKEN", lambda: store.list_workers(page_token=token))


@pytest.mark.parametrize("key", [[], [1], [2**64], ["a", "b"], [None], ["x" * 5000]])
def test_forged_page_tokens_are_invalid_argument(store: CatalogStore, key: list[object]) -> None:
    from server_kit import filtering

    store.create_model("m-0", llm())
    for listing, prefix in ((store.list_models, "models?"), (store.list_workers, "workers?")):
        forged = paging.encode_page_token(key, prefix + filtering.canonical([]))  # type: ignore[arg-type]
        raises(InvalidArgument, "INVALID_PAGE_TOKEN", lambda: listing(page_token=forged))  # noqa: B023


# --------------------------------------------------------------------------- update / save


def test_update_applies_only_masked_fields_and_renews_etag(store: CatalogStore, clock: FakeClock) -> None:
    created = store.create_model("m", llm(display_name="old", description="keep", tags=["a"]))
    clock.advance(5)
    change = model_pb2.Model(
        name="models/m", display_name="new", description="ignored", tags=["b", "c"], labels={"team": "nlp"}
    )
    updated = store.update_model(change, ["display_name", "tags", "labels"])

    assert updated.display_name == "new"
    assert updated.description == "keep"
    assert list(updated.tags) == ["b", "c"]
    assert dict(updated.labels) == {"team": "nlp"}
    assert updated.llm == created.llm and updated.create_time == created.create_time
    assert updated.etag != created.etag
    assert updated.update_time.ToSeconds() == created.update_time.ToSeconds() + 5
    assert store.get_model("m") == updated
    # The indexed copies follow.
    assert names(store.list_models(filter="tag = b AND labels.team = nlp")[0]) == ["m"]
    assert store.list_models(filter="tag = a")[0] == []


def test_update_with_stale_etag_is_aborted(store: CatalogStore) -> None:
    created = store.create_model("m", llm(display_name="v1"))
    store.update_model(model_pb2.Model(name="models/m", display_name="v2"), ["display_name"])
    stale = model_pb2.Model(name="models/m", display_name="v3", etag=created.etag)
    raises(Aborted, "ETAG_MISMATCH", lambda: store.update_model(stale, ["display_name"]))
    assert store.get_model("m").display_name == "v2"
    current = store.get_model("m")
    fresh = model_pb2.Model(name="models/m", display_name="v3", etag=current.etag)
    assert store.update_model(fresh, ["display_name"]).display_name == "v3"


def test_update_refuses_paths_outside_the_allowed_set(store: CatalogStore) -> None:
    store.create_model("m", llm())
    error = raises(
        InvalidArgument,
        "INVALID_UPDATE_MASK",
        lambda: store.update_model(
            model_pb2.Model(name="models/m", state=model_pb2.MODEL_STATE_FAILED), ["state"]
        ),
    )
    assert "display_name" in error.message and "parent" in error.message
    assert store.get_model("m").state == model_pb2.MODEL_STATE_READY


def test_update_single_label_and_empty_mask(store: CatalogStore) -> None:
    store.create_model("m", llm(labels={"team": "nlp", "zone": "eu"}))
    updated = store.update_model(model_pb2.Model(name="models/m", labels={"team": "vision"}), ["labels.team"])
    assert dict(updated.labels) == {"team": "vision", "zone": "eu"}
    removed = store.update_model(model_pb2.Model(name="models/m"), ["labels.zone"])
    assert dict(removed.labels) == {"team": "vision"}
    # No mask: every updatable field set in the request.
    everything = store.update_model(model_pb2.Model(name="models/m", author="me", license="mit"), [])
    assert (everything.author, everything.license) == ("me", "mit")
    assert dict(everything.labels) == {"team": "vision"}


def test_update_parent_checks_existence_and_cycles(store: CatalogStore) -> None:
    store.create_model("root", llm())
    store.create_model("child", llm(parent="root"))
    store.create_model("other", llm())
    moved = store.update_model(model_pb2.Model(name="models/other", parent="child"), ["parent"])
    assert moved.parent == "models/child"
    raises(
        InvalidArgument,
        "LINEAGE_CYCLE",
        lambda: store.update_model(model_pb2.Model(name="models/root", parent="models/other"), ["parent"]),
    )
    raises(
        FailedPrecondition,
        "PARENT_NOT_FOUND",
        lambda: store.update_model(model_pb2.Model(name="models/root", parent="ghost"), ["parent"]),
    )
    unparented = store.update_model(model_pb2.Model(name="models/other", parent=""), ["parent"])
    assert unparented.parent == ""
    assert names(store.list_models(filter='parent = ""')[0]) == ["other", "root"]


def test_update_missing_model_is_not_found(store: CatalogStore) -> None:
    raises(
        NotFound,
        "MODEL_NOT_FOUND",
        lambda: store.update_model(model_pb2.Model(name="models/none", display_name="x"), ["display_name"]),
    )


def test_save_model_moves_an_import_through_its_states(store: CatalogStore, clock: FakeClock) -> None:
    importing = model_pb2.Model(kind=model_pb2.MODEL_KIND_LLM, state=model_pb2.MODEL_STATE_IMPORTING)
    created = store.create_model("imp", importing, source_key="local:/models/imp")
    clock.advance(1)

    validating = store.get_model("imp")
    validating.state = model_pb2.MODEL_STATE_VALIDATING
    validating.files.add(path="model.safetensors", size_bytes=10, sha256="ab" * 32)
    validating = store.save_model(validating, expected_etag=created.etag)

    ready = model_pb2.Model()
    ready.CopyFrom(validating)
    ready.state = model_pb2.MODEL_STATE_READY
    ready.llm.architecture = "LlamaForCausalLM"
    ready.version = 99  # ignored: versions are fixed at creation
    ready.create_time.Clear()
    saved = store.save_model(ready, expected_etag=validating.etag)

    assert saved.state == model_pb2.MODEL_STATE_READY
    assert saved.create_time == created.create_time and saved.version == 1
    assert len({created.etag, validating.etag, saved.etag}) == 3
    assert store.get_model("imp") == saved
    assert names(store.list_models(filter="state = READY AND architecture = LlamaForCausalLM")[0]) == ["imp"]
    raises(Aborted, "ETAG_MISMATCH", lambda: store.save_model(ready, expected_etag=validating.etag))
    raises(NotFound, "MODEL_NOT_FOUND", lambda: store.save_model(model_pb2.Model(name="models/nope")))


def test_a_second_store_on_the_same_database_sees_every_write(db_url: str, clock: FakeClock) -> None:
    first = CatalogStore(db_url, clock=clock)
    second = CatalogStore(db_url, clock=clock, auto_migrate=False)
    try:
        first.create_model("shared", llm(display_name="v1"))
        assert first.get_model("shared").display_name == "v1"  # now cached in `first`
        second.update_model(model_pb2.Model(name="models/shared", display_name="v2"), ["display_name"])
        assert first.get_model("shared").display_name == "v2"
        assert names(first.list_models()[0]) == ["shared"]
        second.delete_model("shared")
        second.create_model("shared", llm(display_name="v3"))
        assert first.get_model("shared").display_name == "v3"
    finally:
        first.close()
        second.close()


# --------------------------------------------------------------------------- delete / lineage


def build_tree(store: CatalogStore) -> None:
    """root ─┬─ ft-1 ── ft-2
    #         └─ ad-1"""
    store.create_model("root", llm(tags=["base"]))
    store.create_model("ft-1", llm(parent="root", labels={"k": "v"}))
    store.create_model("ft-2", llm(parent="models/ft-1"))
    store.create_model("ad-1", llm(parent="root"))


def test_delete_with_descendants_needs_force(store: CatalogStore) -> None:
    build_tree(store)
    error = raises(FailedPrecondition, "MODEL_HAS_DESCENDANTS", lambda: store.delete_model("root"))
    assert all(f"models/{m}" in error.message for m in ("ft-1", "ft-2", "ad-1"))
    assert error.metadata["descendants"] == "models/ad-1,models/ft-1,models/ft-2"
    assert len(store.list_models()[0]) == 4

    deleted = store.delete_model("models/root", force=True)
    assert deleted == ["models/ft-2", "models/ad-1", "models/ft-1", "models/root"]
    assert store.list_models()[0] == []
    assert store.list_models(filter="tag = base")[0] == []
    raises(NotFound, "MODEL_NOT_FOUND", lambda: store.get_model("root"))
    store.create_model("root", llm())  # the id is free again


def test_delete_leaf_etag_and_missing(store: CatalogStore) -> None:
    build_tree(store)
    leaf = store.get_model("ft-2")
    raises(Aborted, "ETAG_MISMATCH", lambda: store.delete_model("ft-2", etag="stale"))
    assert store.delete_model("ft-2", etag=leaf.etag) == ["models/ft-2"]
    assert store.delete_model("ft-1") == ["models/ft-1"]
    raises(NotFound, "MODEL_NOT_FOUND", lambda: store.delete_model("ft-1"))


def test_lineage_ancestors_nearest_first_descendants_breadth_first(store: CatalogStore) -> None:
    build_tree(store)
    ancestors, descendants = store.get_lineage("ft-2")
    assert names(ancestors) == ["ft-1", "root"]
    assert descendants == []
    ancestors, descendants = store.get_lineage("models/root")
    assert ancestors == []
    assert names(descendants) == ["ad-1", "ft-1", "ft-2"]
    assert descendants[1] == store.get_model("ft-1")
    raises(NotFound, "MODEL_NOT_FOUND", lambda: store.get_lineage("nope"))


# --------------------------------------------------------------------------- versions / recovery


def test_reimporting_a_source_gets_the_next_version(store: CatalogStore) -> None:
    key = "hf:acme/tiny-llama@main"
    assert store.next_version(key) == 1
    store.create_model("tiny-llama", llm(), source_key=key)
    assert store.next_version(key) == 2
    store.create_model("tiny-llama-v2", llm(version=2), source_key=key)
    store.create_model("unrelated", llm(), source_key="local:/elsewhere")
    assert store.next_version(key) == 3
    assert [(m.name, m.version) for m in store.find_by_source(key)] == [
        ("models/tiny-llama", 1),
        ("models/tiny-llama-v2", 2),
    ]
    long_key = "local:/" + "deep/" * 1000
    store.create_model("long", llm(), source_key=long_key)
    assert store.next_version(long_key) == 2
    assert names(store.find_by_source(long_key)) == ["long"]


def test_find_by_local_path_and_hub_repo(store: CatalogStore) -> None:
    def hub(model_id: str, repo_id: str, version: int, state: int) -> None:
        model = llm(state=state, version=version, local_path=f"/cache/{model_id}")
        model.source.hugging_face.repo_id = repo_id
        store.create_model(model_id, model)

    hub("llama", "Acme/Llama", 1, model_pb2.MODEL_STATE_READY)
    hub("llama-v2", "acme/llama", 2, model_pb2.MODEL_STATE_READY)
    hub("llama-v3", "acme/llama", 3, model_pb2.MODEL_STATE_FAILED)
    hub("other", "acme/other", 1, model_pb2.MODEL_STATE_READY)

    # READY entries first, newest version first; repo ids compare without case.
    assert names(store.find_by_hub_repo("ACME/llama")) == ["llama-v2", "llama", "llama-v3"]
    assert store.find_by_hub_repo("acme/none") == []
    found = store.find_by_local_path("/cache/other")
    assert found is not None and found.name == "models/other"
    assert store.find_by_local_path("/cache/none") is None
    assert store.find_by_local_path("") is None


def test_fail_unfinished_imports_marks_interrupted_entries_failed(store: CatalogStore) -> None:
    store.create_model("importing", llm(state=model_pb2.MODEL_STATE_IMPORTING))
    store.create_model("validating", llm(state=model_pb2.MODEL_STATE_VALIDATING))
    ready = store.create_model("ready", llm())

    assert store.fail_unfinished_imports() == ["models/importing", "models/validating"]
    for model_id in ("importing", "validating"):
        model = store.get_model(model_id)
        assert model.state == model_pb2.MODEL_STATE_FAILED
        assert model.error.reason == "IMPORT_INTERRUPTED"
        assert "import it again" in model.error.message
    assert store.get_model("ready") == ready
    assert names(store.list_models(filter="state = FAILED")[0]) == ["importing", "validating"]
    assert store.fail_unfinished_imports() == []


# --------------------------------------------------------------------------- workers


def vllm_worker(address: str = "10.0.0.1:50052", **fields: Any) -> worker_pb2.Worker:
    worker = worker_pb2.Worker(address=address, role=worker_pb2.WORKER_ROLE_INFERENCE, **fields)
    worker.capabilities.engine = "vllm"
    worker.capabilities.architectures.append("LlamaForCausalLM")
    worker.device.type = worker_pb2.DEVICE_TYPE_CPU
    worker.device.memory_bytes = 8 << 30
    return worker


def test_register_is_idempotent_and_keeps_create_time(store: CatalogStore, clock: FakeClock) -> None:
    first = store.upsert_worker("vllm-0", vllm_worker())
    assert first.name == "workers/vllm-0"
    assert first.state == worker_pb2.WORKER_STATE_HEALTHY
    assert first.create_time == first.last_heartbeat_time
    clock.advance(10)
    again = store.upsert_worker("workers/vllm-0", vllm_worker(address="10.0.0.2:50052"))
    assert again.create_time == first.create_time
    assert again.last_heartbeat_time.ToSeconds() == first.last_heartbeat_time.ToSeconds() + 10
    assert store.get_worker("vllm-0") == again
    assert len(store.all_workers()) == 1
    assert store.get_worker("vllm-0").address == "10.0.0.2:50052"
    raises(InvalidArgument, "INVALID_WORKER_ID", lambda: store.upsert_worker("Bad_Id", vllm_worker()))


def test_heartbeat_updates_load_memory_and_loaded_models(store: CatalogStore, clock: FakeClock) -> None:
    store.upsert_worker("vllm-0", vllm_worker())
    clock.advance(3)
    beat = store.heartbeat(
        "vllm-0",
        load=worker_pb2.WorkerLoad(running=2, queued=1),
        free_memory_bytes=1 << 30,
        loaded_models=[worker_pb2.LoadedModel(model="models/llama-a", adapters=["models/ad-1"])],
        state=worker_pb2.WORKER_STATE_HEALTHY,
    )
    assert (beat.load.running, beat.load.queued) == (2, 1)
    assert beat.device.free_memory_bytes == 1 << 30
    assert beat.device.memory_bytes == 8 << 30  # registration data kept
    assert [m.model for m in beat.loaded_models] == ["models/llama-a"]
    assert store.get_worker("vllm-0") == beat
    # Omitted values keep what was stored; arguments may also be positional.
    kept = store.heartbeat("vllm-0", worker_pb2.WorkerLoad(running=1), None, None)
    assert kept.load.running == 1
    assert kept.device.free_memory_bytes == 1 << 30 and len(kept.loaded_models) == 1
    raises(NotFound, "WORKER_NOT_FOUND", lambda: store.heartbeat("ghost"))
    raises(
        InvalidArgument,
        "INVALID_WORKER_STATE",
        lambda: store.heartbeat("vllm-0", state=worker_pb2.WORKER_STATE_UNAVAILABLE),
    )


def test_lapsed_heartbeat_makes_a_worker_unavailable_until_it_beats_again(
    store: CatalogStore, clock: FakeClock
) -> None:
    store.upsert_worker("fresh", vllm_worker())
    store.upsert_worker("stale", vllm_worker())
    clock.advance(20)
    store.heartbeat("fresh")
    clock.advance(15)  # stale: 35 s since its last beat; fresh: 15 s

    assert store.get_worker("stale").state == worker_pb2.WORKER_STATE_UNAVAILABLE
    assert store.get_worker("fresh").state == worker_pb2.WORKER_STATE_HEALTHY
    assert [w.name for w in store.list_workers(filter="state = UNAVAILABLE")[0]] == ["workers/stale"]
    assert [w.name for w in store.list_workers(filter="state = HEALTHY")[0]] == ["workers/fresh"]
    assert [w.name for w in store.list_workers(filter="state != UNAVAILABLE")[0]] == ["workers/fresh"]
    assert {w.name: w.state for w in store.all_workers()} == {
        "workers/fresh": worker_pb2.WORKER_STATE_HEALTHY,
        "workers/stale": worker_pb2.WORKER_STATE_UNAVAILABLE,
    }

    recovered = store.heartbeat("stale")
    assert recovered.state == worker_pb2.WORKER_STATE_HEALTHY
    assert store.list_workers(filter="state = UNAVAILABLE")[0] == []


def test_draining_is_reported_and_filtered(store: CatalogStore, clock: FakeClock) -> None:
    store.upsert_worker("a", vllm_worker())
    store.upsert_worker("b", vllm_worker())
    drained = store.heartbeat("a", state=worker_pb2.WORKER_STATE_DRAINING)
    assert drained.state == worker_pb2.WORKER_STATE_DRAINING
    assert store.heartbeat("a").state == worker_pb2.WORKER_STATE_DRAINING  # unset keeps it
    assert [w.name for w in store.list_workers(filter="state = DRAINING")[0]] == ["workers/a"]
    clock.advance(31)
    assert store.get_worker("a").state == worker_pb2.WORKER_STATE_UNAVAILABLE
    assert store.list_workers(filter="state = DRAINING")[0] == []


def test_list_workers_filters_and_pages(store: CatalogStore) -> None:
    for index in range(5):
        store.upsert_worker(f"vllm-{index}", vllm_worker())
    trainer = worker_pb2.Worker(address="t:1", role=worker_pb2.WORKER_ROLE_TRAINING)
    trainer.capabilities.engine = "peft"
    store.upsert_worker("trainer-0", trainer)

    assert [w.name for w in store.list_workers(filter="role = TRAINING")[0]] == ["workers/trainer-0"]
    assert len(store.list_workers(filter='engine = "vllm" AND role = WORKER_ROLE_INFERENCE')[0]) == 5
    assert [w.name for w in store.list_workers(filter="name = trainer*")[0]] == ["workers/trainer-0"]
    raises(InvalidArgument, "INVALID_FILTER", lambda: store.list_workers(filter="gpu = h100"))
    raises(InvalidArgument, "INVALID_FILTER", lambda: store.list_workers(filter="role = chef"))

    seen: list[str] = []
    token = ""
    while True:
        workers, token = store.list_workers(page_size=4, page_token=token)
        seen.extend(w.name for w in workers)
        if not token:
            break
    assert seen == ["workers/trainer-0"] + [f"workers/vllm-{i}" for i in range(5)]


def test_deregister_removes_the_worker(store: CatalogStore) -> None:
    store.upsert_worker("vllm-0", vllm_worker())
    store.delete_worker("workers/vllm-0")
    raises(NotFound, "WORKER_NOT_FOUND", lambda: store.get_worker("vllm-0"))
    raises(NotFound, "WORKER_NOT_FOUND", lambda: store.delete_worker("vllm-0"))
    assert store.all_workers() == []


# --------------------------------------------------------------------------- schema and availability


def test_migrations_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    db_url = empty_db_url
    assert db.current_revision(db_url) is None
    db.migrate(db_url)
    assert db.current_revision(db_url) == db.head_revision()
    engine = db.make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"models", "model_tags", "model_labels", "workers"} <= tables

        db.downgrade(db_url, "base")
        assert db.current_revision(db_url) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        db.migrate(db_url)
        assert db.current_revision(db_url) == db.head_revision()
    finally:
        engine.dispose()
    store = CatalogStore(db_url)
    try:
        store.create_model("after-migrations", llm())
        assert names(store.list_models()[0]) == ["after-migrations"]
    finally:
        store.close()


def test_migrations_match_the_declared_schema(empty_db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db_url = empty_db_url
    db.migrate(db_url)
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_unreachable_database_is_unavailable() -> None:
    store = CatalogStore("postgresql+psycopg://postgres@127.0.0.1:1/none", auto_migrate=False)
    try:
        error = raises(Unavailable, "DATABASE_UNAVAILABLE", lambda: store.get_model("x"))
        assert isinstance(error.__cause__, OperationalError)
        raises(Unavailable, "DATABASE_UNAVAILABLE", store.check)
    finally:
        store.close()


# --------------------------------------------------------------------------- bounds, sweeping, page bytes


def test_every_stored_worker_string_is_bounded(store: CatalogStore) -> None:
    """A worker token cannot store a 40 MB display name (nor any other huge string)."""
    huge = "x" * (1 << 20)
    for change in (
        lambda w: setattr(w, "display_name", huge),
        lambda w: setattr(w, "address", huge),
        lambda w: w.capabilities.architectures.append(huge),
        lambda w: w.loaded_models.add(model=huge),
    ):
        worker = vllm_worker()
        change(worker)
        error = raises(InvalidArgument, "VALUE_TOO_LONG", partial(store.upsert_worker, "w", worker))
        assert error.violations
    store.upsert_worker("w", vllm_worker())
    raises(
        InvalidArgument,
        "VALUE_TOO_LONG",
        lambda: store.heartbeat("w", loaded_models=[worker_pb2.LoadedModel(model=huge)]),
    )


def test_every_stored_model_string_is_bounded(store: CatalogStore) -> None:
    huge = "d" * (8 << 20)
    raises(InvalidArgument, "VALUE_TOO_LONG", lambda: store.create_model("big", llm(description=huge)))
    store.create_model("small", llm(description="fine"))
    entry = store.get_model("small")
    entry.description = huge
    raises(InvalidArgument, "VALUE_TOO_LONG", lambda: store.update_model(entry, ["description"]))
    entry = store.get_model("small")
    entry.llm.tokenizer.chat_template = huge
    raises(InvalidArgument, "VALUE_TOO_LONG", lambda: store.save_model(entry))


def test_expired_workers_are_swept(store: CatalogStore, clock: FakeClock) -> None:
    store.upsert_worker("old", vllm_worker())
    clock.advance(31)
    assert store.get_worker("old").state == worker_pb2.WORKER_STATE_UNAVAILABLE  # shown a while
    clock.advance(store.worker_retention)
    store.upsert_worker("new", vllm_worker())  # registrations sweep
    assert [w.name for w in store.all_workers()] == ["workers/new"]
    raises(NotFound, "WORKER_NOT_FOUND", lambda: store.get_worker("old"))
    clock.advance(store.worker_retention + 31)
    assert store.sweep_workers() == ["workers/new"]
    assert store.all_workers() == []


def test_pages_are_sized_by_bytes_as_well_as_count(store: CatalogStore) -> None:
    from server_kit import paging

    description = "d" * 60_000
    count = paging.MAX_PAGE_BYTES // 60_000 + 20
    for index in range(count):
        store.create_model(f"m-{index:04d}", llm(description=description))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        models, token = store.list_models(page_size=1000, page_token=token)
        pages += 1
        assert sum(m.ByteSize() for m in models) <= paging.MAX_PAGE_BYTES
        seen.extend(m.name for m in models)
        if not token:
            break
    assert pages >= 2
    assert seen == [f"models/m-{index:04d}" for index in range(count)]
    for index in range(90):
        worker = vllm_worker()
        worker.display_name = "w" * 3000
        worker.capabilities.architectures.extend(f"{index}-{n}-" + "a" * 2000 for n in range(25))
        store.upsert_worker(f"w-{index:03d}", worker)
    workers, token = store.list_workers(page_size=1000)
    assert token and sum(w.ByteSize() for w in workers) <= paging.MAX_PAGE_BYTES
