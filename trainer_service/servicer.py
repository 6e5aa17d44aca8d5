"""TrainerService servicer: translates protos to domain calls and back, nothing else."""

from __future__ import annotations

from modelyard.trainer.v1 import trainer_service_pb2_grpc


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """RPCs not implemented here answer UNIMPLEMENTED."""
