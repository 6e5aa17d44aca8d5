"""TLS and mTLS on a real catalog: typed client and grpcurl, with and without the right certificates."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.channel import TlsConfig
from clients.errors import ModelyardRpcError
from server_kit import security
from tests.helpers import tool
from tests.security.certs import Pki
from tests.security.conftest import SecureServer, StartCatalog


def _unreachable(client: CatalogClient) -> ModelyardRpcError:
    with pytest.raises(ModelyardRpcError) as caught:
        client.list_models_page()
    return caught.value


def grpcurl_tls(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real grpcurl binary, with TLS (no -plaintext): pass -cacert/-cert/-key in `args`."""
    return subprocess.run(
        [tool("grpcurl"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def tls_catalog(start_catalog: StartCatalog, pki: Pki) -> SecureServer:
    """A catalog serving TLS (no client certificates required)."""
    return start_catalog(tls_cert=pki.server_cert, tls_key=pki.server_key)


@pytest.fixture
def mtls_catalog(start_catalog: StartCatalog, pki: Pki) -> SecureServer:
    """A catalog serving TLS that requires client certificates signed by the test CA."""
    return start_catalog(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert)


def test_tls_client_trusting_the_ca_reads_and_writes(tls_catalog: SecureServer, pki: Pki) -> None:
    with CatalogClient(tls_catalog.target, tls=TlsConfig(ca_cert=pki.ca_cert), timeout=10) as client:
        assert client.list_models_page().models == []
        # By host name too: the certificate names localhost.
    with CatalogClient(f"localhost:{tls_catalog.port}", tls=TlsConfig(ca_cert=pki.ca_cert)) as client:
        assert client.list_models_page().models == []


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_catalog: SecureServer) -> None:
    with CatalogClient(tls_catalog.target, timeout=3) as client:
        error = _unreachable(client)
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_client_not_trusting_the_server_ca_is_refused(tls_catalog: SecureServer, pki: Pki) -> None:
    with CatalogClient(tls_catalog.target, tls=TlsConfig(ca_cert=pki.other_ca_cert), timeout=3) as client:
        error = _unreachable(client)
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_from_the_configured_ca(mtls_catalog: SecureServer, pki: Pki) -> None:
    good = TlsConfig(ca_cert=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key)
    with CatalogClient(mtls_catalog.target, tls=good, timeout=10) as client:
        assert client.list_models_page().models == []

    no_cert = TlsConfig(ca_cert=pki.ca_cert)
    foreign = TlsConfig(
        ca_cert=pki.ca_cert, client_cert=pki.other_client_cert, client_key=pki.other_client_key
    )
    for refused in (no_cert, foreign):
        with CatalogClient(mtls_catalog.target, tls=refused, timeout=3) as client:
            assert _unreachable(client).code == grpc.StatusCode.UNAVAILABLE
    with CatalogClient(mtls_catalog.target, timeout=3) as client:
        assert _unreachable(client).code == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_over_tls_and_mtls(tls_catalog: SecureServer, mtls_catalog: SecureServer, pki: Pki) -> None:
    method = "modelyard.catalog.v1.CatalogService/ListModels"
    ok = grpcurl_tls("-cacert", str(pki.ca_cert), "-d", "{}", tls_catalog.target, method)
    assert ok.returncode == 0, ok.stderr
    plaintext = grpcurl_tls("-plaintext", "-d", "{}", tls_catalog.target, method)
    assert plaintext.returncode != 0

    mtls = grpcurl_tls(
        "-cacert", str(pki.ca_cert), "-cert", str(pki.client_cert), "-key", str(pki.client_key),
        "-d", "{}", mtls_catalog.target, method,
    )  # fmt: skip
    assert mtls.returncode == 0, mtls.stderr
    without_cert = grpcurl_tls("-cacert", str(pki.ca_cert), "-d", "{}", mtls_catalog.target, method)
    assert without_cert.returncode != 0


def test_plaintext_server_warns_at_start(
    start_catalog: StartCatalog, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    start_catalog()
    assert "PLAINTEXT" in caplog.text
    assert "authentication is OFF" in caplog.text
    caplog.clear()
    start_catalog(tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert "serves TLS" in caplog.text
    assert "PLAINTEXT" not in caplog.text


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("server_cert", None, None, "set both MODELYARD_TLS_CERT and MODELYARD_TLS_KEY"),
        (None, None, "ca_cert", "MODELYARD_TLS_CLIENT_CA needs"),
        ("missing", "server_key", None, "MODELYARD_TLS_CERT: cannot read"),
    ],
)
def test_bad_tls_settings_fail_at_start_with_the_setting_named(
    pki: Pki, cert: str | None, key: str | None, ca: str | None, message: str
) -> None:
    def path(name: str | None) -> Path | None:
        if name is None:
            return None
        return pki.ca_cert.parent / "nope.pem" if name == "missing" else Path(getattr(pki, name))

    with pytest.raises(ValueError, match=message):
        security.server_credentials(path(cert), path(key), path(ca))
