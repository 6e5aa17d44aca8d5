"""`python -m server_kit.healthcheck ADDRESS [SERVICE]`: exit 0 when SERVING.

A probe for containers and scripts: asks `grpc.health.v1.Health/Check` at
ADDRESS (default `localhost:50051`) for SERVICE (default: the whole server)
and exits 0 on SERVING, 1 otherwise, within a 3 s deadline.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    """True when `service` at `address` reports SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else "localhost:50051"
    service = args[1] if len(args) > 1 else ""
    ok = check(address, service)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
