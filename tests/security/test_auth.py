"""Bearer tokens and roles on a real catalog: who may call what, what is logged, what is audited."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.catalog import CatalogClient
from clients.channel import TlsConfig
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import catalog_service_pb2, worker_pb2
from tests.helpers import grpcurl, tool
from tests.security.certs import Pki
from tests.security.conftest import (
    ADMIN_TOKEN,
    ALL_TOKENS,
    READER_TOKEN,
    TOKENS,
    WORKER_TOKEN,
    SecureServer,
    StartCatalog,
    audit_lines,
    catalog_settings,
)


def _error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> ModelyardRpcError:
    with pytest.raises(ModelyardRpcError) as caught:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            next(result)
    return caught.value


def _worker(address: str = "localhost:1") -> worker_pb2.Worker:
    return worker_pb2.Worker(address=address, role=worker_pb2.WORKER_ROLE_INFERENCE)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[SecureServer]:
    """One catalog requiring tokens (TOKENS), auditing to `<root>/audit.jsonl`."""
    root = tmp_path_factory.mktemp("auth")
    settings = catalog_settings(root, models_root, tokens=TOKENS, audit_log=str(root / "audit.jsonl"))
    from catalog_service.app import CatalogApp

    server = SecureServer(CatalogApp(settings), settings)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def audit_path(catalog: SecureServer) -> Path:
    return Path(catalog.settings.audit_log)


def client(server: SecureServer, token: str | None = None, **kwargs: Any) -> CatalogClient:
    return CatalogClient(server.target, token=token, timeout=30, **kwargs)


def entries_for(path: Path, method: str, resource: str = "") -> list[dict[str, Any]]:
    return [
        e
        for e in audit_lines(path)
        if e["method"] == method and (not resource or e.get("resource") == resource)
    ]


# ------------------------------------------------------------------------------ authentication


def test_no_token_is_unauthenticated(catalog: SecureServer) -> None:
    with client(catalog) as anonymous:
        error = _error(anonymous.list_models_page)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == "MISSING_CREDENTIALS"
        assert "authorization: Bearer" in error.message
        watch = _error(anonymous.watch_model, "anything")  # streaming RPCs too
        assert watch.code == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_or_malformed_token_is_unauthenticated(catalog: SecureServer) -> None:
    with client(catalog, "not-a-configured-token-at-all") as stranger:
        error = _error(stranger.list_models_page)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    with grpc.insecure_channel(catalog.target) as channel:
        stub = channel.unary_unary(
            "/modelyard.catalog.v1.CatalogService/ListModels",
            request_serializer=catalog_service_pb2.ListModelsRequest.SerializeToString,
            response_deserializer=catalog_service_pb2.ListModelsResponse.FromString,
        )
        for header in (f"Basic {READER_TOKEN}", "Bearer", f"Bearer {READER_TOKEN} extra"):
            with pytest.raises(grpc.RpcError) as caught:
                stub(
                    catalog_service_pb2.ListModelsRequest(), metadata=[("authorization", header)], timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, header
        # Case of the scheme does not matter (RFC 7235).
        stub(catalog_service_pb2.ListModelsRequest(), metadata=[("authorization", f"bearer {READER_TOKEN}")])


def test_malformed_body_without_a_token_is_unauthenticated(catalog: SecureServer) -> None:
    """Authentication comes before the body is looked at: junk bytes tell a stranger nothing."""
    garbage = b"\xff\xff\xff\xff\x0f"

    def send(channel: grpc.Channel, method: str, token: str | None) -> grpc.StatusCode:
        path = f"/modelyard.catalog.v1.CatalogService/{method}"
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            if method == "WatchModel":
                list(channel.unary_stream(path)(garbage, metadata=metadata, timeout=10))
            else:
                channel.unary_unary(path)(garbage, metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with grpc.insecure_channel(catalog.target) as channel:
        for method in ("ListModels", "ImportModel", "RegisterWorker", "WatchModel"):
            assert send(channel, method, None) == grpc.StatusCode.UNAUTHENTICATED, method
            # With a valid token the same bytes are a malformed request.
            assert send(channel, method, ADMIN_TOKEN) == grpc.StatusCode.INVALID_ARGUMENT, method


def test_health_and_reflection_need_no_token(catalog: SecureServer) -> None:
    with grpc.insecure_channel(catalog.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = grpcurl(catalog.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "modelyard.catalog.v1.CatalogService" in listed.stdout


# ------------------------------------------------------------------------------ authorization


def test_reader_reads_but_cannot_import(catalog: SecureServer, models_root: Path) -> None:
    with client(catalog, READER_TOKEN) as reader:
        reader.list_models_page()
        error = _error(reader.import_model, str(models_root / "tiny.Q8_0.gguf"), model_id="by-reader")
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "ROLE_NOT_ALLOWED"
        assert error.metadata["required_role"] == "admin"
        assert error.metadata["role"] == "reader"
        assert "dashboard" in error.message  # the token's name, never the token
        assert _error(reader.get_model, "by-reader").code == grpc.StatusCode.NOT_FOUND


def test_admin_imports_and_deletes(catalog: SecureServer, models_root: Path, audit_path: Path) -> None:
    source = str(models_root / "tiny.Q8_0.gguf")
    with client(catalog, ADMIN_TOKEN) as admin:
        model = admin.import_model(source, model_id="by-admin")
        assert model.name == "models/by-admin"
        assert admin.delete_model("by-admin") == ["models/by-admin"]
    imported = entries_for(audit_path, "ImportModel", "models/by-admin")
    assert len(imported) == 1
    entry = imported[0]
    assert entry["service"] == "modelyard.catalog.v1.CatalogService"
    assert (entry["principal"], entry["role"], entry["code"]) == ("ops", "admin", "OK")
    assert entry["source"] == source
    assert entry["time"].endswith("Z") and entry["request_id"] and entry["peer"]
    deleted = entries_for(audit_path, "DeleteModel", "models/by-admin")
    assert [(e["principal"], e["code"]) for e in deleted] == [("ops", "OK")]


def test_worker_registers_and_heartbeats_but_cannot_touch_models(
    catalog: SecureServer, models_root: Path, audit_path: Path
) -> None:
    with client(catalog, ADMIN_TOKEN) as admin:
        admin.import_model(str(models_root / "tiny.Q8_0.gguf"), model_id="kept")
    with client(catalog, WORKER_TOKEN) as worker:
        worker.register_worker("gpu-1", _worker("10.0.0.1:50053"))
        beat = worker.heartbeat(catalog_service_pb2.HeartbeatRequest(name="workers/gpu-1"))
        assert beat.name == "workers/gpu-1"
        assert worker.get_model("kept").name == "models/kept"  # workers read models
        for call, args in ((worker.delete_model, ("kept",)), (worker.import_model, (str(models_root),))):
            error = _error(call, *args)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED
            assert error.metadata["role"] == "worker"
        worker.deregister_worker("gpu-1")
    with client(catalog, READER_TOKEN) as reader:
        assert reader.get_model("kept").name == "models/kept"
    registered = entries_for(audit_path, "RegisterWorker", "workers/gpu-1")
    assert [(e["principal"], e["role"], e["code"]) for e in registered] == [("gpu-node-1", "worker", "OK")]
    assert entries_for(audit_path, "DeregisterWorker", "workers/gpu-1")[0]["code"] == "OK"
    # Successful heartbeats are not audited (one every few seconds per worker).
    assert entries_for(audit_path, "Heartbeat", "workers/gpu-1") == []
    denied = entries_for(audit_path, "DeleteModel", "models/kept")
    assert [(e["principal"], e["code"], e["reason"]) for e in denied] == [
        ("gpu-node-1", "PERMISSION_DENIED", "ROLE_NOT_ALLOWED")
    ]


def test_nobody_without_the_worker_role_registers_a_worker(catalog: SecureServer, audit_path: Path) -> None:
    hijack = _worker("attacker.example:50053")
    with client(catalog) as anonymous:
        assert _error(anonymous.register_worker, "gpu-1", hijack).code == grpc.StatusCode.UNAUTHENTICATED
    with client(catalog, READER_TOKEN) as reader:
        assert _error(reader.register_worker, "gpu-1", hijack).code == grpc.StatusCode.PERMISSION_DENIED
        assert _error(reader.heartbeat, catalog_service_pb2.HeartbeatRequest(name="workers/gpu-1")).code == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert [w.address for w in reader.list_workers()] == []
    refused = entries_for(audit_path, "RegisterWorker", "workers/gpu-1")
    codes = [(e.get("principal", ""), e["code"]) for e in refused if e["code"] != "OK"]
    assert ("", "UNAUTHENTICATED") in codes and ("dashboard", "PERMISSION_DENIED") in codes
    assert any(
        e["method"] == "Heartbeat" and e["code"] == "PERMISSION_DENIED" for e in audit_lines(audit_path)
    )


def test_workers_report_engine_outcomes_readers_cannot(
    catalog: SecureServer, models_root: Path, audit_path: Path
) -> None:
    with client(catalog, ADMIN_TOKEN) as admin:
        admin.import_model(str(models_root / "tiny.Q8_0.gguf"), model_id="tried")
    said = worker_pb2.EngineOutcome(
        engine="vllm", engine_version="0.1", supported=False, message="no kernel", worker="workers/gpu-1"
    )
    with client(catalog, READER_TOKEN) as reader:
        error = _error(reader.report_engine_outcome, "tried", said)
        assert (error.code, error.metadata["required_role"]) == (grpc.StatusCode.PERMISSION_DENIED, "worker")
    with client(catalog, WORKER_TOKEN) as worker:
        recorded = worker.report_engine_outcome("tried", said)
        assert recorded.message == "no kernel" and recorded.model_etag
    reported = entries_for(audit_path, "ReportEngineOutcome", "models/tried")
    assert [(e.get("principal", ""), e["code"]) for e in reported] == [
        ("dashboard", "PERMISSION_DENIED"),
        ("gpu-node-1", "OK"),
    ]


def test_reads_are_not_audited(catalog: SecureServer, audit_path: Path) -> None:
    before = len(audit_lines(audit_path))
    with client(catalog, READER_TOKEN) as reader:
        reader.list_models_page()
        reader.list_models_page(filter='state = "READY"')
    assert len(audit_lines(audit_path)) == before


def test_grpcurl_with_a_bearer_header(catalog: SecureServer) -> None:
    method = "modelyard.catalog.v1.CatalogService/ListModels"
    ok = grpcurl("-H", f"authorization: Bearer {READER_TOKEN}", "-d", "{}", catalog.target, method)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout or "{}") is not None
    missing = grpcurl("-d", "{}", catalog.target, method)
    assert missing.returncode != 0
    assert "Unauthenticated" in missing.stderr
    denied = grpcurl(
        "-H",
        f"authorization: Bearer {READER_TOKEN}",
        "-d",
        '{"name": "models/kept"}',
        catalog.target,
        "modelyard.catalog.v1.CatalogService/DeleteModel",
    )
    assert "PermissionDenied" in denied.stderr


# ------------------------------------------------------------------------------ secrecy


def test_tokens_never_reach_logs_or_the_audit(
    tmp_path: Path, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = catalog_settings(tmp_path, models_root, tokens=TOKENS, audit_log=str(tmp_path / "audit.jsonl"))
    from catalog_service.app import CatalogApp

    server = SecureServer(CatalogApp(settings), settings)
    try:
        for token in (*ALL_TOKENS, "wrong-token-0123456789abcdef"):
            with client(server, token) as caller:
                for call in (
                    lambda c=caller: c.list_models_page(),
                    lambda c=caller: c.import_model(str(models_root / "tiny.Q8_0.gguf"), model_id="t"),
                    lambda c=caller: c.delete_model("t"),
                    lambda c=caller: c.register_worker("w", _worker()),
                ):
                    try:
                        call()
                    except ModelyardRpcError as error:
                        assert token not in str(error)
    finally:
        server.stop()
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert "ImportModel" in audit_text and "UNAUTHENTICATED" in audit_text
    assert "authentication is OFF" not in caplog.text
    for token in (*ALL_TOKENS, "wrong-token-0123456789abcdef"):
        assert token not in caplog.text
        assert token not in audit_text


def test_audit_log_names_the_client_certificate_and_anonymous_callers(
    start_catalog: StartCatalog, pki: Pki, models_root: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "mtls-audit.jsonl"
    server = start_catalog(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert, audit_log=str(audit)
    )
    tls = TlsConfig(ca_cert=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key)
    with CatalogClient(server.target, tls=tls) as caller:  # auth off: any holder of a CA-signed cert
        caller.import_model(str(models_root / "tiny.Q8_0.gguf"), model_id="via-mtls")
    (entry,) = entries_for(audit, "ImportModel")
    assert entry["cert_subject"] == "CN=inference-worker-1,O=Modelyard tests"
    assert entry["principal"] == "anonymous"
    assert entry["resource"] == "models/via-mtls"


def test_mtls_and_tokens_together_with_grpcurl(start_catalog: StartCatalog, pki: Pki) -> None:
    server = start_catalog(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert, tokens=TOKENS
    )
    tls = TlsConfig(ca_cert=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key)
    with CatalogClient(server.target, tls=tls, token=READER_TOKEN) as reader:
        assert reader.list_models_page().models == []
    with CatalogClient(server.target, tls=tls) as certificate_only:
        assert _error(certificate_only.list_models_page).code == grpc.StatusCode.UNAUTHENTICATED
    args = ["-cacert", str(pki.ca_cert), "-cert", str(pki.client_cert), "-key", str(pki.client_key)]
    ran = subprocess.run(
        [tool("grpcurl"), *args, "-H", f"authorization: Bearer {READER_TOKEN}", "-d", "{}", server.target,
         "modelyard.catalog.v1.CatalogService/ListModels"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr


def test_cli_connects_with_certificates_and_a_token(
    start_catalog: StartCatalog, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.cli import main

    server = start_catalog(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert, tokens=TOKENS
    )
    tls = ["--ca-cert", str(pki.ca_cert), "--client-cert", str(pki.client_cert)]
    tls += ["--client-key", str(pki.client_key)]
    base = ["models", "list", "--catalog", server.target, *tls, "--json"]
    assert main([*base, "--token", READER_TOKEN]) == 0
    capsys.readouterr()
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "MISSING_CREDENTIALS" in err
