"""A real catalog process configured by environment: /metrics over HTTP, JSON logs, console traces.

One `python -m catalog_service` process with `MODELYARD_CATALOG_METRICS_PORT`,
`MODELYARD_LOG_FORMAT=json` and `MODELYARD_OTEL_EXPORTER=console` answers known
calls; the tests then read what an operator would: the scrape, the log lines and
the exported spans.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.catalog import CatalogClient
from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc, model_pb2, worker_pb2
from tests.helpers import ServerProcess, free_port
from tests.observability.scrape import Samples, scrape, value

SERVICE = "modelyard.catalog.v1.CatalogService"
REQUEST_ID = "obs-req-42"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class Catalog:
    """The catalog process and what it was asked."""

    def __init__(self, root: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = root / "catalog.log"
        self.process = ServerProcess(
            "catalog_service",
            ["--data-dir", str(root / "data")],
            env={
                "MODELYARD_CATALOG_METRICS_PORT": str(self.metrics_port),
                "MODELYARD_LOG_FORMAT": "json",
                "MODELYARD_OTEL_EXPORTER": "console",
                "OTEL_BSP_SCHEDULE_DELAY": "50",  # export spans within 50 ms, not 5 s
                "MODELYARD_DRAIN_SECONDS": "0",
            },
            log_path=self.log_path,
        )
        self.process.wait_serving()
        model = model_pb2.Model(display_name="Observed", state=model_pb2.MODEL_STATE_READY)
        model.llm.architecture = "LlamaForCausalLM"
        with CatalogClient(self.process.address) as client:
            self.created = client.create_model("observed", model)
            for _ in range(3):
                client.get_model("models/observed")
            client.register_worker(
                "observed-worker",
                worker_pb2.Worker(address="localhost:1", role=worker_pb2.WORKER_ROLE_INFERENCE),
            )
        with grpc.insecure_channel(self.process.address) as channel:
            stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetModel(
                    catalog_service_pb2.GetModelRequest(name="models/missing"),
                    timeout=10,
                    metadata=[
                        ("x-request-id", REQUEST_ID),
                        ("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),
                    ],
                )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    running = Catalog(tmp_path_factory.mktemp("observed-catalog"))
    try:
        yield running
    finally:
        running.process.stop()


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object that starts a line of `text` (one-line logs and multi-line console spans)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\{", text, re.MULTILINE):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def wait_for(find: Any, catalog: Catalog, what: str, timeout: float = 15.0) -> Any:
    """Poll the process output until `find(output)` returns something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find(catalog.output())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} in the output:\n{catalog.output()[-3000:]}")


def rpc(method: str, **labels: str) -> dict[str, str]:
    return {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": "unary", **labels}


def test_metrics_count_each_call_by_method_and_code(catalog: Catalog) -> None:
    samples: Samples = scrape(catalog.metrics_port)
    handled = "modelyard_grpc_server_handled_total"
    assert value(samples, handled, **rpc("GetModel", grpc_code="OK")) == 3
    assert value(samples, handled, **rpc("GetModel", grpc_code="NOT_FOUND")) == 1
    assert value(samples, handled, **rpc("CreateModel", grpc_code="OK")) == 1
    assert value(samples, "modelyard_grpc_server_started_total", **rpc("GetModel")) == 4
    assert value(samples, "modelyard_grpc_server_handling_seconds_count", **rpc("GetModel")) == 4
    assert (
        value(samples, "modelyard_grpc_server_in_flight", grpc_service=SERVICE, grpc_method="GetModel") == 0
    )
    # Methods never called are there at zero, so rates exist from the first scrape.
    assert value(samples, handled, **rpc("DeleteModel", grpc_code="OK")) == 0
    # The latency histogram's buckets are cumulative and end at the count.
    assert value(samples, "modelyard_grpc_server_handling_seconds_bucket", **rpc("GetModel", le="+Inf")) == 4
    # The process collector is there too (CPU, memory, open files).
    assert value(samples, "process_cpu_seconds_total") is not None


def test_metrics_show_catalog_sizes(catalog: Catalog) -> None:
    samples = scrape(catalog.metrics_port)
    state = model_pb2.ModelState.Name(catalog.created.state).removeprefix("MODEL_STATE_")
    assert value(samples, "modelyard_catalog_models", kind="LLM", state=state) == 1
    assert value(samples, "modelyard_catalog_models", kind="IMAGE", state="READY") == 0
    assert value(samples, "modelyard_catalog_workers", role="INFERENCE", state="HEALTHY") == 1
    assert value(samples, "modelyard_catalog_workers", role="TRAINING", state="HEALTHY") == 0


def test_logs_are_json_lines_with_the_callers_request_id(catalog: Catalog) -> None:
    def not_found_line(output: str) -> dict[str, Any] | None:
        for line in output.splitlines():
            if line.startswith("{") and REQUEST_ID in line:
                entry = json.loads(line)
                if entry.get("logger") == "modelyard.rpc":
                    return dict(entry)
        return None

    entry = wait_for(not_found_line, catalog, "log line of the NOT_FOUND call")
    assert entry["request_id"] == REQUEST_ID
    assert entry["level"] == "INFO"
    assert "GetModel" in entry["message"] and "NOT_FOUND" in entry["message"]
    assert set(entry) >= {"time", "level", "logger", "message", "request_id"}
    output = catalog.output()
    # Start-up lines are JSON too, with no request id; nothing is logged in the text format.
    logs = [obj for obj in json_objects(output) if "logger" in obj]
    assert any(obj["logger"] == "modelyard.server" and obj["request_id"] == "-" for obj in logs)
    assert not re.search(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ (INFO|WARNING|ERROR) modelyard", output, re.MULTILINE)


def test_console_exporter_prints_a_server_span_continuing_the_callers_trace(catalog: Catalog) -> None:
    def server_span(output: str) -> dict[str, Any] | None:
        for obj in json_objects(output):
            context = obj.get("context") or {}
            if context.get("trace_id") == f"0x{TRACE_ID}":
                return obj
        return None

    span = wait_for(server_span, catalog, "span of the traced call")
    assert span["name"] == f"{SERVICE}/GetModel"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["parent_id"] == f"0x{PARENT_SPAN_ID}"
    assert span["attributes"]["rpc.system"] == "grpc"
    assert span["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span["attributes"]["modelyard.request_id"] == REQUEST_ID
    assert span["status"]["status_code"] == "UNSET"  # NOT_FOUND is the caller's error, not the server's
    assert span["resource"]["attributes"]["service.name"] == "modelyard-catalog"
