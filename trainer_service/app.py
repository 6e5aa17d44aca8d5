"""The trainer service as a `ServiceApp`."""

from __future__ import annotations

from grpc import aio

from modelyard.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc
from trainer_service.servicer import TrainerServicer
from trainer_service.settings import TrainerSettings

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerApp:
    """Serves `modelyard.trainer.v1.TrainerService`."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.servicer = TrainerServicer()

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)

    def add_to_server(self, server: aio.Server) -> None:
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        return None
