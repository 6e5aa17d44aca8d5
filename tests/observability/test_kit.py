"""The observability kit on its own: settings checks, tracing off by default, a busy metrics
port, and the trainer's gauges read from a real job store."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from clients.channel import call_metadata
from clients.errors import ModelyardRpcError
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit import tracing
from server_kit.logs import request_id_var
from server_kit.metrics import ScrapeCollector, bind_host, wrap_handler
from tests.observability.scrape import scrape, value
from tests.servers import ThreadedServer
from trainer_service.app import TrainerApp
from trainer_service.db import migrate
from trainer_service.jobs import JobStore
from trainer_service.metrics import trainer_metrics
from trainer_service.settings import TrainerSettings


def test_tracing_is_off_unless_configured() -> None:
    assert not tracing.enabled()
    assert tracing.client_interceptors() == []
    assert tracing.aio_client_interceptors() == []
    assert tracing.server_interceptors() == []
    tracing.configure("none", "modelyard-catalog")
    assert not tracing.enabled()


def test_an_unknown_exporter_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="none, console, otlp"):
        tracing.configure("jaeger", "modelyard-catalog")


def test_service_names_and_bind_hosts() -> None:
    assert tracing.service_name_of(["modelyard.catalog.v1.CatalogService"]) == "modelyard-catalog"
    assert (
        tracing.service_name_of(
            ["modelyard.catalog.v1.CatalogService", "modelyard.trainer.v1.TrainerService"]
        )
        == "modelyard"
    )
    assert bind_host("[::]:50051") == "0.0.0.0"
    assert bind_host("0.0.0.0:9091") == "0.0.0.0"
    assert bind_host("127.0.0.1:9091") == "127.0.0.1"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_busy_metrics_port_is_logged_and_the_server_still_serves(
    tmp_path: Path, busy_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="modelyard.metrics")
    server = ThreadedServer(
        CatalogApp(CatalogSettings(data_dir=tmp_path)), metrics_listen=f"127.0.0.1:{busy_port}"
    )
    try:
        with CatalogClient(server.target) as client, pytest.raises(ModelyardRpcError) as missing:
            client.get_model("models/absent")
        assert missing.value.code.name == "NOT_FOUND"  # the gRPC side serves
        assert server.server.metrics is not None and server.server.metrics.port == 0
        assert f"cannot listen on 127.0.0.1:{busy_port}" in caplog.text
    finally:
        server.stop()


def test_a_failing_scrape_collector_leaves_out_only_its_own_metrics(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Metric]:
        raise ConnectionError("database is down")

    registry = CollectorRegistry()
    registry.register(ScrapeCollector("broken", broken))
    caplog.set_level(logging.WARNING, logger="modelyard.metrics")
    assert generate_latest(registry) == b""
    assert "metrics broken: could not be computed" in caplog.text


def _samples(families: Iterable[Metric]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(ScrapeCollector("trainer", lambda: families))
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_trainer_gauges_show_job_states_and_the_progress_of_running_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainer.db'}"
    migrate(url)
    store = JobStore(url)
    try:
        for job_id in ("first", "second"):
            store.create(
                job_id,
                pb.TrainingJob(
                    base_model="models/tiny",
                    method=pb.TRAINING_METHOD_LORA,
                    dataset=pb.Dataset(source="/d.jsonl"),
                ),
            )
        claimed = store.claim_next("trainer-a", lease_seconds=60)
        assert claimed is not None
        store.record_progress(
            claimed.job_id,
            "trainer-a",
            pb.TrainingProgress(step=3, total_steps=10, epoch=0.3, loss=1.5, samples_per_second=2.0),
        )
        samples = _samples(trainer_metrics(store, [claimed.job_id], job_slots=1))
    finally:
        store.close()

    def gauge(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    assert gauge("modelyard_trainer_jobs", state="QUEUED") == 1
    assert gauge("modelyard_trainer_jobs", state="RUNNING") == 1
    assert gauge("modelyard_trainer_jobs", state="SUCCEEDED") == 0
    assert gauge("modelyard_trainer_running_jobs") == 1
    assert gauge("modelyard_trainer_job_slots") == 1
    job = {"job": claimed.job_id, "method": "LORA"}
    assert gauge("modelyard_trainer_job_step", **job) == 3
    assert gauge("modelyard_trainer_job_total_steps", **job) == 10
    assert gauge("modelyard_trainer_job_loss", **job) == 1.5
    assert gauge("modelyard_trainer_job_samples_per_second", **job) == 2.0
    assert gauge("modelyard_trainer_job_tokens_per_second", **job) is None  # not reported: left out


def test_calls_made_while_handling_an_rpc_forward_its_request_id() -> None:
    assert call_metadata(None) == []  # outside an RPC: no request id
    assert call_metadata("t") == [("authorization", "Bearer t")]
    token = request_id_var.set("req-9")
    try:
        assert call_metadata(None) == [("x-request-id", "req-9")]
        assert call_metadata(None, [("x-request-id", "mine")]) == [("x-request-id", "mine")]
    finally:
        request_id_var.reset(token)


def test_a_trainer_server_serves_its_gauges_over_http(tmp_path: Path) -> None:
    app = TrainerApp(TrainerSettings(data_dir=tmp_path, max_concurrent_jobs=2, worker_id="trainer-observed"))
    server = ThreadedServer(app, metrics_listen="127.0.0.1:0")
    try:
        assert server.server.metrics is not None
        samples = scrape(server.server.metrics.port)
    finally:
        server.stop()
    assert value(samples, "modelyard_trainer_jobs", state="QUEUED") == 0
    assert value(samples, "modelyard_trainer_running_jobs") == 0
    assert value(samples, "modelyard_trainer_job_slots") == 2
    assert (
        value(
            samples,
            "modelyard_grpc_server_handled_total",
            grpc_service="modelyard.trainer.v1.TrainerService",
            grpc_method="CreateTrainingJob",
            grpc_type="unary",
            grpc_code="OK",
        )
        == 0
    )


class _StandInContext:
    """Stands in for grpc's ServicerContext: an RPC that set no code (grpc cannot be made to
    abandon a stream at a chosen point, so the wrapped handler is driven directly)."""

    def code(self) -> None:
        return None


async def test_a_stream_abandoned_mid_send_is_closed_through_and_counted_cancelled() -> None:
    closed: list[str] = []
    codes: list[grpc.StatusCode] = []

    async def handler(request: object, context: object) -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.append("handler")

    wrapped = wrap_handler(grpc.unary_stream_rpc_method_handler(handler), lambda _c: codes.append)
    responses = wrapped.unary_stream(None, _StandInContext())
    assert await anext(responses) == 0  # suspended at a yield, as while grpc sends a message
    # grpc drops it; Python closes it later, from a task of its own.
    await asyncio.get_running_loop().create_task(responses.aclose())
    assert closed == ["handler"]
    assert codes == [grpc.StatusCode.CANCELLED]
