"""The catalog as a `ServiceApp`: store, import flow and servicer wired together."""

from __future__ import annotations

from grpc import aio

from catalog_service.servicer import CatalogServicer
from catalog_service.settings import CatalogSettings
from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc

SERVICE_NAME = catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name


class CatalogApp:
    """Opens the catalog's resources and serves `modelyard.catalog.v1.CatalogService`."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: CatalogSettings) -> None:
        self.settings = settings
        self.servicer = CatalogServicer()

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)

    def add_to_server(self, server: aio.Server) -> None:
        catalog_service_pb2_grpc.add_CatalogServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        return None
