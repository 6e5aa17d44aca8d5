"""Bounds on what a request may carry, and refusals of unsafe files, through a real catalog's RPCs.

Also covered elsewhere through the real RPC: paths outside the allowed roots and
symlink escapes (tests/catalog/test_catalog_service.py), trust_remote_code
(tests/security/test_service_calls.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from server_kit.security import FILTER_BYTES, NAME_FIELD_BYTES
from tests.security.conftest import SecureServer, StartCatalog


@pytest.fixture
def catalog(start_catalog: StartCatalog) -> SecureServer:
    """A catalog with a small message limit (64 KiB), so a too-large message is cheap to send."""
    return start_catalog(max_message_bytes=64 * 1024)


def _error(call: object, *args: object, **kwargs: object) -> ModelyardRpcError:
    assert callable(call)
    with pytest.raises(ModelyardRpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_too_long_filter_is_invalid_argument(catalog: SecureServer) -> None:
    with CatalogClient(catalog.target) as client:
        fits = 'name = "' + "a" * (FILTER_BYTES - 20) + '"'
        assert client.list_models_page(filter=fits).models == []
        too_long = 'name = "' + "a" * FILTER_BYTES + '"'  # a valid filter, only too long
        error = _error(client.list_models_page, filter=too_long)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "VALUE_TOO_LONG"
    assert error.field_violations == [("filter", f"at most {FILTER_BYTES} bytes")]


def test_too_long_resource_name_is_invalid_argument(catalog: SecureServer) -> None:
    with CatalogClient(catalog.target) as client:
        assert _error(client.get_model, "x" * 100).code == grpc.StatusCode.NOT_FOUND
        error = _error(client.get_model, "é" * NAME_FIELD_BYTES)  # 2 bytes a character
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "VALUE_TOO_LONG")


def test_too_large_message_is_resource_exhausted(catalog: SecureServer) -> None:
    with CatalogClient(catalog.target) as client:
        error = _error(client.import_model, "/nowhere", description="x" * (100 * 1024))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(client.list_models()) == []


def test_pickle_weights_are_refused_through_the_rpc(catalog: SecureServer, models_root: Path) -> None:
    folder = models_root / "pickles"
    folder.mkdir(exist_ok=True)
    with CatalogClient(catalog.target) as client:
        for name in ("pytorch_model.bin", "weights.pt", "model.ckpt"):
            pickle = folder / name
            pickle.write_bytes(b"\x80\x04K\x01.")  # a real (harmless) pickle
            error = _error(client.import_model, str(pickle), model_id="pickled")
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION, name
            assert error.reason == "PICKLE_WEIGHTS_REFUSED", name
            assert name in error.message
        assert list(client.list_models()) == []


def test_filters_are_parsed_never_spliced_into_sql(catalog: SecureServer, models_root: Path) -> None:
    with CatalogClient(catalog.target) as client:
        client.import_model(str(models_root / "tiny.Q8_0.gguf"), model_id="kept")
        for hostile in (
            "name = \"x' OR '1'='1\"",
            'name = "kept\\" OR 1=1 --"',
            'name = "\'; DROP TABLE models; --"',
        ):
            assert client.list_models_page(filter=hostile).models == [], hostile
        refused = _error(client.list_models_page, filter="name = kept OR 1 = 1")
        assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
        assert [m.name for m in client.list_models()] == ["models/kept"]
