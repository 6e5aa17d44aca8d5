"""Token configuration, the role of every RPC, and the token tool."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modelyard.catalog.v1 import catalog_service_pb2
from modelyard.inference.v1 import inference_service_pb2
from modelyard.trainer.v1 import trainer_service_pb2
from server_kit import security
from server_kit.security import ADMIN, OPEN, READER, WORKER, Authenticator, load_tokens, parse_tokens

ALL_RPCS = {
    f"/{service.full_name}/{method.name}"
    for module in (catalog_service_pb2, trainer_service_pb2, inference_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}


def test_every_rpc_has_an_explicit_role() -> None:
    """Adding an RPC forces a decision here; until then it would need admin (fail closed)."""
    assert set(security.METHOD_ROLES) == ALL_RPCS
    assert security.required_role("/modelyard.catalog.v1.CatalogService/SomethingNew") == ADMIN


def test_roles_of_the_rpcs_the_issue_names() -> None:
    mutating = {
        "catalog.v1.CatalogService/ImportModel": ADMIN,
        "catalog.v1.CatalogService/CreateModel": ADMIN,
        "catalog.v1.CatalogService/UpdateModel": ADMIN,
        "catalog.v1.CatalogService/DeleteModel": ADMIN,
        "catalog.v1.CatalogService/RegisterWorker": WORKER,
        "catalog.v1.CatalogService/Heartbeat": WORKER,
        "catalog.v1.CatalogService/DeregisterWorker": WORKER,
        "catalog.v1.CatalogService/ReportEngineOutcome": WORKER,
        "trainer.v1.TrainerService/CreateTrainingJob": ADMIN,
        "trainer.v1.TrainerService/CancelTrainingJob": ADMIN,
        "trainer.v1.TrainerService/MergeAdapter": ADMIN,
        "trainer.v1.TrainerService/ExportModel": ADMIN,
        "inference.v1.InferenceService/LoadModel": ADMIN,
        "inference.v1.InferenceService/UnloadModel": ADMIN,
    }
    for method, role in mutating.items():
        assert security.required_role(f"/modelyard.{method}") == role, method
        assert security.is_mutating(f"/modelyard.{method}")
    for method in ALL_RPCS - {f"/modelyard.{m}" for m in mutating}:
        assert security.required_role(method) == READER, method
        assert not security.is_mutating(method)
    assert security.required_role("/grpc.health.v1.Health/Check") == OPEN
    assert security.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == OPEN


def test_role_grants_nest() -> None:
    assert security.ROLE_GRANTS[READER] == {READER}
    assert security.ROLE_GRANTS[WORKER] == {READER, WORKER}
    assert security.ROLE_GRANTS[ADMIN] == {READER, WORKER, ADMIN}


def test_tokens_file_with_comments_and_hashed_entries(tmp_path: Path) -> None:
    hashed = "hashed-token-0123456789abcdef"
    digest = hashlib.sha256(hashed.encode()).hexdigest()
    path = tmp_path / "tokens"
    path.write_text(
        "# name:role:token\n"
        "ops:admin:plain-token-0123456789abcdef   # the on-call team\n"
        "\n"
        f"ci:reader:sha256:{digest.upper()}\n"
    )
    entries = load_tokens(path, "node-1:worker:worker-token-0123456789abcdef")
    assert [(e.name, e.role) for e in entries] == [("ops", "admin"), ("ci", "reader"), ("node-1", "worker")]
    auth = Authenticator(entries)
    found = auth.identify(hashed)
    assert found is not None and found.name == "ci"
    identified = auth.identify("plain-token-0123456789abcdef")
    assert identified is not None and identified.role == ADMIN
    assert auth.identify("plain-token-0123456789abcdeF") is None
    assert auth.identify("") is None
    assert "plain-token" not in repr(entries)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ops:admin", "expected NAME:ROLE:TOKEN"),
        ("ops:root:secret-token-0123456789", "unknown role 'root'"),
        ("ops:admin:short", "at least 16 characters"),
        ("ops:admin:sha256:abc", "64 hex digits"),
        ("bad name:admin:secret-token-0123456789", "name must be"),
        ("a:admin:secret-token-0123456789,a:reader:other-token-0123456789", "configured twice"),
        ("a:admin:secret-token-0123456789,b:reader:secret-token-0123456789", "also another name's token"),
    ],
)
def test_bad_token_entries_are_refused_without_echoing_the_token(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        load_tokens(None, text)
    assert "secret-token" not in str(caught.value)
    assert "MODELYARD_TOKENS" in str(caught.value) or "configured twice" in message or "another" in message


def test_missing_tokens_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MODELYARD_TOKENS_FILE: cannot read"):
        load_tokens(tmp_path / "absent", "")


def test_bearer_metadata_parsing() -> None:
    assert security.bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert security.bearer_token([("x-request-id", "1"), ("authorization", "bearer  abc ")]) == "abc"
    assert security.bearer_token([("authorization", "Basic abc")]) == ""
    assert security.bearer_token([("authorization", "Bearer a b")]) == ""
    assert security.bearer_token([("x-request-id", "1")]) is None
    assert security.bearer_token(None) is None


def test_token_tool_prints_a_token_and_a_line_that_holds_only_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert security.main(["token", "ci-bot", "reader"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    line = out[1].rsplit(" ", 1)[1]
    assert token not in line
    (entry,) = parse_tokens(line, "printed line")
    assert (entry.name, entry.role) == ("ci-bot", "reader")
    assert Authenticator([entry]).identify(token) == entry
    assert security.main(["token", "x", "superuser"]) == 2


@pytest.mark.parametrize("service", ["catalog_service", "trainer_service"])
def test_unwritable_audit_log_stops_start_up_with_one_line(tmp_path: Path, service: str) -> None:
    """A data dir the audit log cannot be created in: one line naming the setting, no traceback."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    env = {**os.environ, "MODELYARD_AUDIT_LOG": str(blocker / "audit" / "audit.log")}
    done = subprocess.run(
        [sys.executable, "-m", service, "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, lines
    assert "MODELYARD_AUDIT_LOG" in lines[0]
