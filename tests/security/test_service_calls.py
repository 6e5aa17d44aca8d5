"""Service-to-service calls carry the service's own token: an inference server and an authenticating catalog.

Real servers built by `make_server` from settings: a catalog that requires
tokens, and inference servers (transformers engine; no engine starts here)
that register with it. The inference server also requires tokens itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from tests.security.conftest import (
    ADMIN_TOKEN,
    READER_TOKEN,
    TOKENS,
    WORKER_TOKEN,
    SecureServer,
    audit_lines,
    catalog_settings,
)
from tinymodels.llm import build_llm


@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose config asks for code shipped with the weights (`auto_map`)."""
    folder = build_llm(tmp_path_factory.mktemp("remote") / "custom-llama", arch="llama")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, remote_code_model: Path) -> Iterator[SecureServer]:
    """A catalog requiring tokens, with the remote-code model imported."""
    from catalog_service.app import CatalogApp

    root = tmp_path_factory.mktemp("catalog")
    settings = catalog_settings(
        root, remote_code_model.parent, tokens=TOKENS, audit_log=str(root / "audit.jsonl")
    )
    server = SecureServer(CatalogApp(settings), settings)
    with CatalogClient(server.target, token=ADMIN_TOKEN) as admin:
        admin.import_model(str(remote_code_model), model_id="custom")
    yield server
    server.stop()


def start_inference(root: Path, catalog: SecureServer, worker_id: str, service_token: str) -> SecureServer:
    settings = InferenceSettings(
        data_dir=root / worker_id,
        catalog_address=catalog.target,
        engine="transformers",
        worker_id=worker_id,
        service_token=service_token,
        tokens=TOKENS,
        drain_seconds=0,
    )
    return SecureServer(InferenceApp(settings), settings)


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory, catalog: SecureServer) -> Iterator[SecureServer]:
    """An inference server registered with the catalog under its worker token."""
    server = start_inference(tmp_path_factory.mktemp("inference"), catalog, "inference-sec", WORKER_TOKEN)
    yield server
    server.stop()


def test_inference_registers_with_its_service_token(catalog: SecureServer, inference: SecureServer) -> None:
    app = inference.server.app
    assert isinstance(app, InferenceApp) and app.registration is not None
    assert app.registration.registered.is_set()
    with CatalogClient(catalog.target, token=READER_TOKEN) as reader:
        worker = reader.get_worker("inference-sec")
    assert worker.address == f"localhost:{inference.port}"
    entries = [e for e in audit_lines(Path(catalog.settings.audit_log)) if e["method"] == "RegisterWorker"]
    assert [(e["resource"], e["principal"], e["code"]) for e in entries] == [
        ("workers/inference-sec", "gpu-node-1", "OK")
    ]


def test_without_a_service_token_registration_fails_and_says_why(
    tmp_path: Path, catalog: SecureServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = start_inference(tmp_path, catalog, "inference-no-token", "")
    try:
        app = server.server.app
        assert isinstance(app, InferenceApp) and app.registration is not None
        assert not app.registration.registered.is_set()
        refused = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses" in r.getMessage()]
        assert refused, caplog.text
        message = refused[0].getMessage()
        assert "workers/inference-no-token" in message
        assert "UNAUTHENTICATED" in message
        assert "MODELYARD_SERVICE_TOKEN" in message
        with CatalogClient(catalog.target, token=READER_TOKEN) as reader:
            names = [w.name for w in reader.list_workers()]
        assert "workers/inference-no-token" not in names
    finally:
        server.stop()
    assert WORKER_TOKEN not in caplog.text


def test_inference_rpcs_need_tokens_and_roles(inference: SecureServer) -> None:
    with InferenceClient(inference.target, timeout=30) as anonymous:
        with pytest.raises(ModelyardRpcError) as caught:
            anonymous.get_server_info()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    with InferenceClient(inference.target, token=READER_TOKEN, timeout=30) as reader:
        assert reader.get_server_info().worker_id == "inference-sec"
        with pytest.raises(ModelyardRpcError) as caught:
            reader.load_model("models/custom")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_remote_code_model_is_refused_through_the_real_rpcs(inference: SecureServer) -> None:
    """trust_remote_code is off on this worker: LoadModel refuses before any engine (or code) runs."""
    with InferenceClient(inference.target, token=ADMIN_TOKEN, timeout=60) as admin:
        with pytest.raises(ModelyardRpcError) as caught:
            admin.load_model("models/custom")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.reason == "MODEL_INCOMPATIBLE"
        assert "remote code" in caught.value.message
        assert admin.list_loaded_models() == []
    # The inference server audits its own mutating calls (default file: DATA_DIR/audit.log).
    loads = [e for e in audit_lines(inference.settings.data_dir / "audit.log") if e["method"] == "LoadModel"]
    assert ("models/custom", "ops", "FAILED_PRECONDITION", "MODEL_INCOMPATIBLE") in [
        (e["resource"], e.get("principal"), e["code"], e.get("reason")) for e in loads
    ]
