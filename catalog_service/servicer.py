"""CatalogService servicer: translates protos to domain calls and back, nothing else."""

from __future__ import annotations

from modelyard.catalog.v1 import catalog_service_pb2_grpc


class CatalogServicer(catalog_service_pb2_grpc.CatalogServiceServicer):
    """RPCs not implemented here answer UNIMPLEMENTED."""
