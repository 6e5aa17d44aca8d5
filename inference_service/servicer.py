"""InferenceService servicer: translates protos to domain calls and back, nothing else."""

from __future__ import annotations

from modelyard.inference.v1 import inference_service_pb2_grpc


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """RPCs not implemented here answer UNIMPLEMENTED."""
