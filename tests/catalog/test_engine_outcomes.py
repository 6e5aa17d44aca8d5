"""Engine outcomes and the dry run: the store, ReportEngineOutcome through a real catalog, the
`observed` rule in CheckCompatibility and FindWorkers, and `CheckCompatibility.dry_run`.

Store and RPC tests run on SQLite and PostgreSQL (see conftest.py). The dry run
is tested against small fake inference servers (what the worker answers is
the test's choice) and an address where nothing listens; the real inference
side is tested end to end elsewhere.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from sqlalchemy import func, inspect, select

from catalog_service import db
from catalog_service.app import CatalogApp
from catalog_service.db import EngineOutcomeRow
from catalog_service.outcome_store import MAX_MESSAGE_CHARS, OutcomeStore
from catalog_service.settings import CatalogSettings
from catalog_service.store import CatalogStore
from clients.catalog import AsyncCatalogClient, CatalogClient
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2, worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as ipb
from modelyard.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from server_kit import errors
from tests.clients.doubles import ServicerApp
from tests.servers import ThreadedServer

if TYPE_CHECKING:
    from tests.catalog.conftest import FakeClock

VLLM_VERSION = "0.0.0-test"
CPU = worker_pb2.DEVICE_TYPE_CPU
FAIL = worker_pb2.RULE_OUTCOME_FAIL
PASS = worker_pb2.RULE_OUTCOME_PASS
WARN = worker_pb2.RULE_OUTCOME_WARN
SKIP = worker_pb2.RULE_OUTCOME_SKIP


def tiny_llm(**fields: object) -> model_pb2.Model:
    """A READY tiny Llama entry that a vLLM worker on a CPU with 8 GiB runs."""
    return model_pb2.Model(
        kind=model_pb2.MODEL_KIND_LLM,
        state=model_pb2.MODEL_STATE_READY,
        size_bytes=4_000_000,
        llm=model_pb2.LlmConfig(
            architecture="LlamaForCausalLM",
            model_type="llama",
            weight_format=model_pb2.WEIGHT_FORMAT_SAFETENSORS,
            dtype="float32",
            parameter_count=1_000_000,
            context_length=256,
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        **fields,  # type: ignore[arg-type]
    )


def vllm_worker(
    address: str = "localhost:1", role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE
) -> worker_pb2.Worker:
    """A vLLM worker described by hand (no vLLM import): Llama, safetensors, a CPU with 8 GiB."""
    return worker_pb2.Worker(
        address=address,
        role=role,
        capabilities=worker_pb2.WorkerCapabilities(
            engine="vllm",
            engine_version=VLLM_VERSION,
            kinds=[model_pb2.MODEL_KIND_LLM],
            architectures=["LlamaForCausalLM"],
            weight_formats=[model_pb2.WEIGHT_FORMAT_SAFETENSORS],
            training_methods=["lora"] if role == worker_pb2.WORKER_ROLE_TRAINING else [],
        ),
        device=worker_pb2.Device(type=CPU, count=1, memory_bytes=8 << 30, free_memory_bytes=8 << 30),
    )


def outcome(
    supported: bool = False,
    *,
    engine: str = "vllm",
    version: str = VLLM_VERSION,
    device: worker_pb2.DeviceType.ValueType = CPU,
    message: str = "",
    stage: worker_pb2.EngineOutcomeStage.ValueType = worker_pb2.ENGINE_OUTCOME_STAGE_LOAD,
    worker: str = "workers/gpu-1",
    etag: str = "",
) -> worker_pb2.EngineOutcome:
    return worker_pb2.EngineOutcome(
        engine=engine,
        engine_version=version,
        device_type=device,
        supported=supported,
        message=message or ("loaded" if supported else "CUDA error: no kernel image for head size 80"),
        stage=stage,
        worker=worker,
        model_etag=etag,
    )


def result(report: worker_pb2.CompatibilityReport, rule: str) -> worker_pb2.RuleResult:
    found = [r for r in report.results if r.rule == rule]
    assert len(found) == 1, [r.rule for r in report.results]
    return found[0]


def error_of(call: Callable[..., object], *args: object, **kwargs: object) -> ModelyardRpcError:
    with pytest.raises(ModelyardRpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the store


@pytest.fixture
def outcomes(store: CatalogStore) -> OutcomeStore:
    return OutcomeStore.of(store)


def test_record_sets_report_time_and_the_models_current_etag(
    store: CatalogStore, outcomes: OutcomeStore, clock: FakeClock
) -> None:
    model = store.create_model("llama", tiny_llm())
    recorded = outcomes.record_outcome("llama", outcome())
    assert recorded.report_time.ToDatetime().replace(tzinfo=clock.now.tzinfo) == clock.now
    assert recorded.model_etag == model.etag
    given = outcomes.record_outcome("models/llama", outcome(version="other", etag="given-etag"))
    assert given.model_etag == "given-etag"
    assert outcomes.outcomes_for("llama") == [recorded, given]  # ordered by engine, version, device
    assert outcomes.outcomes_for("models/llama") == [recorded, given]


def test_a_new_report_replaces_the_old_one_per_engine_version_and_device(
    store: CatalogStore, outcomes: OutcomeStore, clock: FakeClock
) -> None:
    store.create_model("llama", tiny_llm())
    outcomes.record_outcome("llama", outcome(False))
    outcomes.record_outcome("llama", outcome(False, device=worker_pb2.DEVICE_TYPE_CUDA))
    outcomes.record_outcome("llama", outcome(True, engine="transformers", version="4.0"))
    clock.advance(5)
    latest = outcomes.record_outcome("llama", outcome(True, stage=worker_pb2.ENGINE_OUTCOME_STAGE_FIRST_STEP))
    found = outcomes.outcomes_for("llama")
    assert [(o.engine, o.device_type, o.supported) for o in found] == [
        ("transformers", CPU, True),
        ("vllm", CPU, True),
        ("vllm", worker_pb2.DEVICE_TYPE_CUDA, False),
    ]
    assert found[1] == latest  # latest wins, whatever the old one said
    clock.advance(5)
    outcomes.record_outcome("llama", outcome(False, message="failed again"))
    again = [o for o in outcomes.outcomes_for("llama") if o.engine == "vllm" and o.device_type == CPU]
    assert [(o.supported, o.message) for o in again] == [(False, "failed again")]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(EngineOutcomeRow)).scalar() == 3


def test_a_dry_run_success_does_not_erase_a_failure_seen_at_the_first_step(
    store: CatalogStore, outcomes: OutcomeStore
) -> None:
    """vLLM's dry run passes a model whose first forward step kills it: the failure stands."""
    store.create_model("llama", tiny_llm())
    first_step = worker_pb2.ENGINE_OUTCOME_STAGE_FIRST_STEP
    failed = outcomes.record_outcome("llama", outcome(False, stage=first_step))
    kept = outcomes.record_outcome("llama", outcome(True, stage=worker_pb2.ENGINE_OUTCOME_STAGE_DRY_RUN))
    assert kept == failed
    assert [o.supported for o in outcomes.outcomes_for("llama")] == [False]
    # A success at the same stage (the engine runs it now) does replace it.
    outcomes.record_outcome("llama", outcome(True, stage=first_step))
    assert [o.supported for o in outcomes.outcomes_for("llama")] == [True]


def test_outcomes_go_with_their_model(store: CatalogStore, outcomes: OutcomeStore) -> None:
    store.create_model("base", tiny_llm())
    store.create_model("child", tiny_llm(parent="models/base"))
    store.create_model("other", tiny_llm())
    for model_id in ("base", "child", "other"):
        outcomes.record_outcome(model_id, outcome())
    assert store.delete_model("base", force=True) == ["models/child", "models/base"]
    assert outcomes.outcomes_for("base") == [] and outcomes.outcomes_for("child") == []
    assert len(outcomes.outcomes_for("other")) == 1
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(EngineOutcomeRow)).scalar() == 1
    # A model created again under the same id starts with no outcomes.
    store.create_model("base", tiny_llm())
    assert outcomes.outcomes_for("base") == []


def test_unknown_model_is_not_found_and_has_no_outcomes(store: CatalogStore, outcomes: OutcomeStore) -> None:
    with pytest.raises(errors.NotFound) as caught:
        outcomes.record_outcome("missing", outcome())
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.metadata == {"model": "models/missing"}
    assert outcomes.outcomes_for("missing") == []


def test_engine_outcomes_migration_upgrades_and_downgrades(empty_db_url: str) -> None:
    db_url = empty_db_url
    db.migrate(db_url, "0001")
    engine = db.make_engine(db_url)
    try:
        assert "engine_outcomes" not in inspect(engine).get_table_names()
        db.migrate(db_url)
        assert db.current_revision(db_url) == db.head_revision()
        assert "engine_outcomes" in inspect(engine).get_table_names()
        store = CatalogStore(db_url, auto_migrate=False)
        store.create_model("kept", tiny_llm())
        OutcomeStore.of(store).record_outcome("kept", outcome())
        assert len(OutcomeStore.of(store).outcomes_for("kept")) == 1

        db.downgrade(db_url, "0001")
        assert "engine_outcomes" not in inspect(engine).get_table_names()
        with engine.connect() as conn:  # the models stay (0003's downgrade made them JSON again)
            assert conn.execute(select(func.count()).select_from(db.ModelRow.__table__)).scalar() == 1

        db.migrate(db_url)
        assert store.get_model("kept").name == "models/kept"
        assert OutcomeStore.of(store).outcomes_for("kept") == []
        store.close()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- through the catalog


@pytest.fixture
def catalog_server(db_url: str, tmp_path: Path) -> Iterator[ThreadedServer]:
    settings = CatalogSettings(data_dir=tmp_path / "data", database_url=db_url, heartbeat_ttl_seconds=30)
    server = ThreadedServer(CatalogApp(settings))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def catalog(catalog_server: ThreadedServer) -> Iterator[CatalogClient]:
    with CatalogClient(catalog_server.target, timeout=30) as client:
        yield client


def test_report_round_trip(catalog: CatalogClient) -> None:
    model = catalog.create_model("llama", tiny_llm())
    long = "Traceback (most recent call last):\n" + "x" * 5000
    recorded = catalog.report_engine_outcome("llama", outcome(message=long, worker="gpu-1"))
    assert recorded.engine == "vllm" and recorded.engine_version == VLLM_VERSION
    assert recorded.device_type == CPU and not recorded.supported
    assert recorded.stage == worker_pb2.ENGINE_OUTCOME_STAGE_LOAD
    assert recorded.worker == "workers/gpu-1"
    assert recorded.model_etag == model.etag  # none given: the model's current etag
    assert recorded.HasField("report_time")
    assert len(recorded.message) == MAX_MESSAGE_CHARS  # cut, not refused
    assert recorded.message.startswith("Traceback") and recorded.message.endswith(" ...")


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        (lambda o: o.ClearField("engine"), "MISSING_FIELD", "outcome.engine"),
        (lambda o: setattr(o, "engine", "   "), "MISSING_FIELD", "outcome.engine"),
        (lambda o: setattr(o, "stage", 9), "UNKNOWN_ENUM_VALUE", "outcome.stage"),
        (lambda o: setattr(o, "device_type", 42), "UNKNOWN_ENUM_VALUE", "outcome.device_type"),
        (lambda o: setattr(o, "engine", "v" * 300), "VALUE_TOO_LONG", "outcome.engine"),
        (lambda o: setattr(o, "engine_version", "1" * 300), "VALUE_TOO_LONG", "outcome.engine_version"),
        (lambda o: setattr(o, "model_etag", "e" * 65), "VALUE_TOO_LONG", "outcome.model_etag"),
        (lambda o: setattr(o, "worker", "w" * 2000), "VALUE_TOO_LONG", "outcome.worker"),
        (lambda o: setattr(o, "engine_version", "0.1\x00"), "INVALID_ARGUMENT", "outcome.engine_version"),
    ],
)
def test_bad_reports_are_invalid_argument_with_the_field(
    catalog: CatalogClient, change: Callable[[worker_pb2.EngineOutcome], None], reason: str, field: str
) -> None:
    catalog.create_model("llama", tiny_llm())
    bad = outcome()
    change(bad)
    error = error_of(catalog.report_engine_outcome, "llama", bad)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert [name for name, _ in error.field_violations] == [field]


def test_report_for_a_missing_or_unnamed_model(catalog: CatalogClient) -> None:
    missing = error_of(catalog.report_engine_outcome, "nothing-here", outcome())
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    unnamed = error_of(catalog.report_engine_outcome, "", outcome())
    assert (unnamed.code, unnamed.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")
    assert unnamed.field_violations[0][0] == "model"


def test_a_reported_failure_moves_the_worker_to_rejected_until_a_success(catalog: CatalogClient) -> None:
    catalog.create_model("llama", tiny_llm())
    catalog.register_worker("gpu-1", vllm_worker())
    before = catalog.check_compatibility("llama", worker="gpu-1")
    assert before.verdict == worker_pb2.VERDICT_COMPATIBLE
    assert result(before, "observed").outcome == SKIP
    assert [m.worker.name for m in catalog.find_workers("llama").matches] == ["workers/gpu-1"]

    catalog.report_engine_outcome("llama", outcome(False, worker="gpu-1"))
    report = catalog.check_compatibility("llama", worker="gpu-1")
    assert report.verdict == worker_pb2.VERDICT_INCOMPATIBLE
    observed = result(report, "observed")
    assert observed.outcome == FAIL
    assert observed.message == (
        f"vllm {VLLM_VERSION} failed on this model at load on workers/gpu-1: "
        "CUDA error: no kernel image for head size 80"
    )
    found = catalog.find_workers("llama", worker_pb2.WORKER_ROLE_INFERENCE)
    assert not found.matches
    assert [r.worker.name for r in found.rejected] == ["workers/gpu-1"]
    assert result(found.rejected[0].report, "observed") == observed

    catalog.report_engine_outcome("llama", outcome(True, worker="gpu-1"))  # latest wins
    again = catalog.check_compatibility("llama", worker="gpu-1")
    assert again.verdict == worker_pb2.VERDICT_COMPATIBLE
    assert result(again, "observed").outcome == PASS
    assert [m.worker.name for m in catalog.find_workers("llama").matches] == ["workers/gpu-1"]


def test_stale_and_foreign_outcomes_are_ignored(catalog: CatalogClient) -> None:
    model = catalog.create_model("llama", tiny_llm())
    catalog.register_worker("gpu-1", vllm_worker())
    catalog.report_engine_outcome("llama", outcome(False, etag="not-the-models-etag"))
    catalog.report_engine_outcome("llama", outcome(False, version="0.0.1-other"))
    catalog.report_engine_outcome("llama", outcome(False, device=worker_pb2.DEVICE_TYPE_CUDA))
    catalog.report_engine_outcome("llama", outcome(False, engine="transformers", version="4.0"))
    report = catalog.check_compatibility("llama", worker="gpu-1")
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE
    assert result(report, "observed").outcome == SKIP

    # A failure for the current etag counts, until the model changes.
    catalog.report_engine_outcome("llama", outcome(False))
    assert catalog.check_compatibility("llama", worker="gpu-1").verdict == worker_pb2.VERDICT_INCOMPATIBLE
    model.display_name = "Llama, changed"
    catalog.update_model(model, ["display_name"])
    changed = catalog.check_compatibility("llama", worker="gpu-1")
    assert changed.verdict == worker_pb2.VERDICT_COMPATIBLE
    assert result(changed, "observed").outcome == SKIP
    assert [m.worker.name for m in catalog.find_workers("llama").matches] == ["workers/gpu-1"]


def test_outcomes_of_a_deleted_model_do_not_come_back(catalog: CatalogClient) -> None:
    catalog.create_model("llama", tiny_llm())
    catalog.register_worker("gpu-1", vllm_worker())
    catalog.report_engine_outcome("llama", outcome(False))
    catalog.delete_model("llama")
    catalog.create_model("llama", tiny_llm())
    assert catalog.check_compatibility("llama", worker="gpu-1").verdict == worker_pb2.VERDICT_COMPATIBLE


# --------------------------------------------------------------------------- the dry run


def test_dry_run_needs_a_registered_inference_worker(catalog: CatalogClient) -> None:
    catalog.create_model("llama", tiny_llm())
    spec = worker_pb2.EngineSpec(
        role=worker_pb2.WORKER_ROLE_INFERENCE, capabilities=vllm_worker().capabilities
    )
    on_spec = error_of(catalog.check_compatibility, "llama", engine_spec=spec, dry_run=True)
    assert (on_spec.code, on_spec.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DRY_RUN_UNSUPPORTED_TARGET")
    assert [name for name, _ in on_spec.field_violations] == ["dry_run"]
    catalog.register_worker("trainer-1", vllm_worker(role=worker_pb2.WORKER_ROLE_TRAINING))
    on_trainer = error_of(catalog.check_compatibility, "llama", worker="trainer-1", dry_run=True)
    assert (on_trainer.code, on_trainer.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "DRY_RUN_UNSUPPORTED_TARGET",
    )
    assert "training worker" in on_trainer.message
    assert [name for name, _ in on_trainer.field_violations] == ["dry_run"]
    # Without dry_run both are checked as before.
    assert catalog.check_compatibility("llama", engine_spec=spec).verdict == worker_pb2.VERDICT_COMPATIBLE


def test_dry_run_on_a_worker_nobody_answers_for_is_a_warning(catalog: CatalogClient) -> None:
    catalog.create_model("llama", tiny_llm())
    address = f"127.0.0.1:{free_port()}"
    catalog.register_worker("gpu-1", vllm_worker(address))
    report = catalog.check_compatibility("llama", worker="gpu-1", dry_run=True)
    dry_run = result(report, "dry_run")
    assert dry_run.outcome == WARN
    assert f"workers/gpu-1 at {address} answered UNAVAILABLE" in dry_run.message
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE_WITH_WARNINGS
    assert report.results[-1] == dry_run


class FakeWorker(ipb_grpc.InferenceServiceServicer):
    """An inference worker whose dry run answers `code` (OK: validated by vLLM), after
    reporting the matching outcome to the catalog at `catalog_address` (unless `report` is off)."""

    def __init__(self, catalog_address: str, code: grpc.StatusCode, *, report: bool = True) -> None:
        self.catalog_address = catalog_address
        self.code = code
        self.report = report
        self.requests: list[ipb.LoadModelRequest] = []

    async def LoadModel(
        self, request: ipb.LoadModelRequest, context: aio.ServicerContext
    ) -> ipb.LoadModelResponse:
        self.requests.append(request)
        ok = self.code == grpc.StatusCode.OK
        said = outcome(
            ok, stage=worker_pb2.ENGINE_OUTCOME_STAGE_DRY_RUN, message="" if ok else "head size 80"
        )
        if self.report:
            async with AsyncCatalogClient(self.catalog_address) as catalog:
                await catalog.report_engine_outcome(request.model, said)
        if ok:
            loaded = ipb.LoadedModel(model=request.model, engine="vllm")
            return ipb.LoadModelResponse(loaded_model=loaded, outcomes=[said])
        if self.code == grpc.StatusCode.FAILED_PRECONDITION:
            raise errors.FailedPrecondition(
                "vllm cannot run models/llama: head size 80", reason="MODEL_INCOMPATIBLE"
            )
        raise errors.PermissionDenied("LoadModel needs the admin role", reason="ROLE_NOT_ALLOWED")


@pytest.fixture
def fake_worker(catalog_server: ThreadedServer) -> Iterator[Callable[..., tuple[FakeWorker, str]]]:
    servers: list[ThreadedServer] = []

    def start(code: grpc.StatusCode, **options: bool) -> tuple[FakeWorker, str]:
        servicer = FakeWorker(catalog_server.target, code, **options)
        app = ServicerApp(
            "modelyard.inference.v1.InferenceService",
            servicer,
            ipb_grpc.add_InferenceServiceServicer_to_server,
        )
        servers.append(ThreadedServer(app))
        return servicer, servers[-1].target

    yield start
    for server in servers:
        server.stop()


def test_dry_run_that_validates(
    catalog: CatalogClient, fake_worker: Callable[..., tuple[FakeWorker, str]]
) -> None:
    catalog.create_model("llama", tiny_llm())
    servicer, address = fake_worker(grpc.StatusCode.OK)
    catalog.register_worker("gpu-1", vllm_worker(address))
    report = catalog.check_compatibility("llama", worker="gpu-1", dry_run=True)
    assert [(r.model, r.validate_only) for r in servicer.requests] == [("models/llama", True)]
    assert result(report, "dry_run").outcome == PASS
    assert result(report, "dry_run").message == "the worker's engines validated it: vllm"
    observed = result(report, "observed")  # the outcome the worker reported before answering
    assert (observed.outcome, observed.message) == (
        PASS,
        f"vllm {VLLM_VERSION} validated this model on workers/gpu-1",
    )
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE


def test_dry_run_that_fails(
    catalog: CatalogClient, fake_worker: Callable[..., tuple[FakeWorker, str]]
) -> None:
    catalog.create_model("llama", tiny_llm())
    _servicer, address = fake_worker(grpc.StatusCode.FAILED_PRECONDITION)
    catalog.register_worker("gpu-1", vllm_worker(address))
    report = catalog.check_compatibility("llama", worker="gpu-1", dry_run=True)  # not an error of the call
    dry_run = result(report, "dry_run")
    assert dry_run.outcome == FAIL
    assert dry_run.message == "workers/gpu-1 would not load it: vllm cannot run models/llama: head size 80"
    assert result(report, "observed").outcome == FAIL
    assert report.verdict == worker_pb2.VERDICT_INCOMPATIBLE
    # The outcome stays recorded: routing sees it without asking again.
    assert not catalog.find_workers("llama").matches


def test_dry_run_refused_by_the_worker_is_a_warning(
    catalog: CatalogClient, fake_worker: Callable[..., tuple[FakeWorker, str]]
) -> None:
    catalog.create_model("llama", tiny_llm())
    _servicer, address = fake_worker(grpc.StatusCode.PERMISSION_DENIED, report=False)
    catalog.register_worker("gpu-1", vllm_worker(address))
    report = catalog.check_compatibility("llama", worker="gpu-1", dry_run=True)
    dry_run = result(report, "dry_run")
    assert dry_run.outcome == WARN
    assert dry_run.message == (
        f"no dry run: workers/gpu-1 at {address} answered PERMISSION_DENIED [ROLE_NOT_ALLOWED]: "
        "LoadModel needs the admin role"
    )
    assert result(report, "observed").outcome == SKIP
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE_WITH_WARNINGS
