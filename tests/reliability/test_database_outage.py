"""PostgreSQL goes down under a running catalog: RPCs fail fast with UNAVAILABLE
(`DATABASE_UNAVAILABLE`), and the catalog recovers by itself once the database is back.

The test runs its own PostgreSQL cluster (never the machine's shared one) and crashes it
with `pg_ctl stop -m immediate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2
from tests.helpers import health_status
from tests.reliability.faults import private_postgres, serve, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SERVICE = "modelyard.catalog.v1.CatalogService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_database_outage_gives_unavailable_then_the_catalog_recovers_by_itself(tmp_path: Path) -> None:
    with private_postgres() as postgres:
        catalog = serve(
            "catalog_service",
            ["--data-dir", str(tmp_path / "catalog")],
            {"MODELYARD_CATALOG_DATABASE_URL": postgres.url},
            log_path=tmp_path / "catalog.log",
        )
        try:
            catalog.wait_serving()
            with CatalogClient(catalog.address, timeout=20) as client:
                client.create_model("before", model_pb2.Model(display_name="before"))
                assert client.get_model("before").display_name == "before"

                postgres.stop("immediate")
                started = time.monotonic()
                calls = {
                    "GetModel": lambda: client.get_model("before"),
                    "ListModels": lambda: client.list_models_page(page_size=10),
                    "CreateModel": lambda: client.create_model("during", model_pb2.Model()),
                    "ListWorkers": lambda: list(client.list_workers()),
                }
                for rpc, call in calls.items():
                    with pytest.raises(ModelyardRpcError) as down:
                        call()
                    assert down.value.code == grpc.StatusCode.UNAVAILABLE, (rpc, down.value)
                    assert down.value.reason == "DATABASE_UNAVAILABLE", (rpc, down.value)
                assert time.monotonic() - started < 30, "an outage must fail calls fast, not hang them"
                # The process stays up (restarting it would not bring the database back):
                # the server's health stays SERVING, the catalog service's turns NOT_SERVING
                # (readiness: send no traffic here) until the database answers again.
                assert catalog.proc.poll() is None
                wait_until(
                    lambda: health_status(catalog.address, SERVICE) == NOT_SERVING,
                    15,
                    "the catalog service to turn NOT_SERVING",
                )
                assert health_status(catalog.address) == health_pb2.HealthCheckResponse.SERVING

                postgres.start()
                wait_until(lambda: client.get_model("before"), 30, "the catalog to answer again")
                wait_until(
                    lambda: health_status(catalog.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING,
                    15,
                    "the catalog service to turn SERVING again",
                )
                client.create_model("after", model_pb2.Model(display_name="after"))
                names = {m.name for m in client.list_models()}
                assert names == {"models/before", "models/after"}
                assert catalog.proc.poll() is None, "the catalog recovered without a restart"
        finally:
            catalog.stop()


def test_catalog_started_without_its_database_exits_with_a_clear_error(tmp_path: Path) -> None:
    with private_postgres() as postgres:
        postgres.stop("immediate")
        catalog = serve(
            "catalog_service",
            ["--data-dir", str(tmp_path / "catalog")],
            {"MODELYARD_CATALOG_DATABASE_URL": postgres.url},
            log_path=tmp_path / "catalog.log",
        )
        try:
            code = catalog.proc.wait(60)
        finally:
            catalog.stop()
        assert code == 1
        log = catalog.log()
        assert "cannot start modelyard.catalog.v1.CatalogService" in log
        assert "DATABASE_UNAVAILABLE" in log
        assert "Traceback" not in log
