"""`MODELYARD_OTEL_EXPORTER=otlp` sends spans to an OTLP/gRPC collector named by `OTEL_*` variables.

The collector here is a real OTLP trace receiver (the `TraceService` of
opentelemetry-proto) on a free port, standing in for an OpenTelemetry Collector
or Jaeger; the catalog is a real process.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from tests.helpers import ServerProcess


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service.name, span name, trace id hex)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            (attributes.get("service.name", ""), span.name, span.trace_id.hex())
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_collector(tmp_path: Path) -> None:
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    catalog = ServerProcess(
        "catalog_service",
        ["--data-dir", str(tmp_path / "data")],
        env={
            "MODELYARD_CATALOG_METRICS_PORT": "0",
            "MODELYARD_OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_SERVICE_NAME": "catalog-eu-1",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "MODELYARD_DRAIN_SECONDS": "0",
        },
        log_path=tmp_path / "catalog.log",
    )
    try:
        catalog.wait_serving()
        with CatalogClient(catalog.address) as client:
            for name in ("models/a", "models/b"):
                with pytest.raises(ModelyardRpcError):  # NOT_FOUND: traced all the same
                    client.get_model(name)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with receiver.lock:
                got = [s for s in receiver.spans if s[1].endswith("CatalogService/GetModel")]
            if len(got) == 2:
                break
            time.sleep(0.05)
    finally:
        catalog.stop()
        collector.stop(0)
    assert len(got) == 2, catalog.log()
    assert {service for service, _, _ in got} == {"catalog-eu-1"}  # OTEL_SERVICE_NAME wins
    assert len({trace_id for _, _, trace_id in got}) == 2  # two calls, two traces
    assert not [s for s in receiver.spans if "grpc.health" in s[1]]  # probes are not traced
