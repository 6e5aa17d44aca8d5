"""The server kit through real servers: reflection, health, shutdown, errors."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from clients.errors import ModelyardRpcError
from server_kit import errors
from server_kit.server import GrpcServer
from tests.helpers import ServerProcess, free_port, grpcurl, health_status

SERVICES = [
    ("catalog_service", "modelyard.catalog.v1.CatalogService", "GetModel"),
    ("trainer_service", "modelyard.trainer.v1.TrainerService", "CreateTrainingJob"),
    ("inference_service", "modelyard.inference.v1.InferenceService", "StreamGenerate"),
]


@pytest.mark.parametrize(("module", "service", "rpc"), SERVICES)
def test_server_lists_describes_and_reports_health(
    tmp_path: Path, module: str, service: str, rpc: str
) -> None:
    server = ServerProcess(
        module,
        ["--data-dir", str(tmp_path)],
        env={"MODELYARD_DRAIN_SECONDS": "2"},
        log_path=tmp_path / "server.log",
    )
    try:
        server.wait_serving(service=service)  # the catalog's service serves once warmed up
        listed = grpcurl(server.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert service in listed.stdout.split()
        assert "grpc.health.v1.Health" in listed.stdout.split()

        described = grpcurl(server.address, "describe", service)
        assert described.returncode == 0, described.stderr
        assert f"rpc {rpc}" in described.stdout

        checked = grpcurl(
            server.address, "grpc.health.v1.Health/Check", data=json.dumps({"service": service})
        )
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout) == {"status": "SERVING"}

        # SIGTERM: health turns NOT_SERVING while the server drains, then it exits cleanly.
        started = time.monotonic()
        server.terminate(signal.SIGTERM)
        seen = None
        while time.monotonic() - started < 2:
            seen = health_status(server.address, timeout=0.5)
            if seen == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert seen == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 15
    finally:
        server.stop()


class _RaisingApp:
    """A test service whose one method raises the error named in the request."""

    service_names = ("test.Errors",)
    in_flight = asyncio.Event()
    release = asyncio.Event()

    ERRORS = {
        "invalid": errors.InvalidArgument(
            "top_p must be in (0, 1]",
            reason="INVALID_SAMPLING",
            violations=[errors.FieldViolation("sampling.top_p", "must be in (0, 1], got 1.5")],
        ),
        "not_found": errors.NotFound(
            "model models/x not found", reason="MODEL_NOT_FOUND", metadata={"model": "x"}
        ),
        "exists": errors.AlreadyExists("models/x exists", reason="MODEL_ALREADY_EXISTS"),
        "precondition": errors.FailedPrecondition("no worker", reason="NO_COMPATIBLE_WORKER"),
        "aborted": errors.Aborted("etag mismatch", reason="ETAG_MISMATCH"),
        "out_of_range": errors.OutOfRange("too long", reason="PROMPT_TOO_LONG"),
        "exhausted": errors.ResourceExhausted("too many requests", reason="TOO_MANY_REQUESTS"),
        "unauthenticated": errors.Unauthenticated("no token", reason="MISSING_TOKEN"),
        "denied": errors.PermissionDenied("read-only token", reason="ADMIN_REQUIRED"),
        "unavailable": errors.Unavailable("database down", reason="DATABASE_UNAVAILABLE"),
        "unimplemented": errors.Unimplemented("later", reason="NOT_IMPLEMENTED"),
    }

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def on_serving(self, port: int) -> None:
        return None

    def add_to_server(self, server: aio.Server) -> None:
        async def raise_error(request: bytes, context: aio.ServicerContext) -> bytes:
            name = request.decode()
            if name == "crash":
                raise RuntimeError("secret internal detail /etc/passwd")
            if name == "slow":
                type(self).in_flight.set()
                await type(self).release.wait()
                return b"done"
            raise self.ERRORS[name]

        handler = grpc.method_handlers_generic_handler(
            "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(raise_error)}
        )
        server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def raising_server():
    server = GrpcServer(_RaisingApp(), f"127.0.0.1:{free_port()}", grace_seconds=5, drain_seconds=0.5)
    await server.start()
    yield server
    await server.stop(grace=0)


async def _call(address: str, name: str, metadata: tuple = ()) -> bytes:
    async with aio.insecure_channel(address) as channel:
        method = channel.unary_unary("/test.Errors/Raise")
        return await method(name.encode(), timeout=10, metadata=metadata)


@pytest.mark.parametrize("name", sorted(_RaisingApp.ERRORS))
async def test_domain_errors_map_to_codes_and_details(raising_server: GrpcServer, name: str) -> None:
    expected = _RaisingApp.ERRORS[name]
    with pytest.raises(aio.AioRpcError) as caught:
        await _call(raising_server.target, name, metadata=(("x-request-id", f"req-{name}"),))
    error = ModelyardRpcError.from_rpc_error(caught.value)
    assert error.code == expected.code
    assert error.message == expected.message
    assert error.reason == expected.reason
    assert error.request_id == f"req-{name}"
    for key, value in expected.metadata.items():
        assert error.metadata[key] == value
    assert error.field_violations == [(v.field, v.description) for v in expected.violations]


async def test_unknown_error_is_internal_without_leaking(raising_server: GrpcServer) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await _call(raising_server.target, "crash")
    error = ModelyardRpcError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "INTERNAL"
    assert "secret" not in error.message and "Traceback" not in error.message
    assert error.request_id and error.request_id in error.message


async def test_graceful_stop_lets_in_flight_rpc_finish(raising_server: GrpcServer) -> None:
    _RaisingApp.in_flight.clear()
    _RaisingApp.release.clear()
    call = asyncio.create_task(_call(raising_server.target, "slow"))
    await asyncio.wait_for(_RaisingApp.in_flight.wait(), 10)
    stopping = asyncio.create_task(raising_server.stop(grace=5))
    # During the drain health says NOT_SERVING while the in-flight call goes on.
    for _ in range(50):
        status = await asyncio.to_thread(health_status, raising_server.target, "", 0.5)
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.02)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not call.done()
    _RaisingApp.release.set()
    assert await asyncio.wait_for(call, 10) == b"done"
    await asyncio.wait_for(stopping, 10)


def test_reflection_resolves_method_and_message_symbols(tmp_path: Path) -> None:
    """`grpcurl describe Service.Method` (what ops users type) works, as do messages and enums."""
    from catalog_service.app import CatalogApp
    from catalog_service.settings import CatalogSettings
    from tests.servers import ThreadedServer

    server = ThreadedServer(CatalogApp(CatalogSettings(data_dir=tmp_path, allowed_roots=[tmp_path])))
    try:
        for symbol, expected in (
            ("modelyard.catalog.v1.CatalogService.GetModel", "rpc GetModel"),
            ("modelyard.catalog.v1.CatalogService.WatchModel", "returns ( stream"),
            ("grpc.health.v1.Health.Check", "rpc Check"),
            ("modelyard.catalog.v1.GetModelRequest", "message GetModelRequest"),
            ("modelyard.catalog.v1.ResolvedFrom", "enum ResolvedFrom"),
        ):
            described = grpcurl(server.target, "describe", symbol)
            assert described.returncode == 0, (symbol, described.stderr)
            assert expected in described.stdout, (symbol, described.stdout)
    finally:
        server.stop()
