"""The inference service as a `ServiceApp`."""

from __future__ import annotations

from grpc import aio

from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings
from modelyard.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class InferenceApp:
    """Serves `modelyard.inference.v1.InferenceService`."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.servicer = InferenceServicer()

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)

    def add_to_server(self, server: aio.Server) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        return None
