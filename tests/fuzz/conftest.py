"""Shared pieces of the fuzz tests: hypothesis settings and the status check.

Every fuzz test sends generated input to a real server and accepts any answer
that is a proper status; INTERNAL (an unhandled exception) and UNKNOWN (a
handler that broke outside the error mapping) fail the test, as does a server
that stops answering.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import grpc
from hypothesis import HealthCheck, settings

T = TypeVar("T")

FUZZ = settings(
    max_examples=int(os.environ.get("MODELYARD_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    database=None,
)
"""Base settings: no per-example deadline (2 shared cores), fixtures are module-scoped servers."""

BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def proper_status(call: Callable[[], T]) -> T | grpc.StatusCode:
    """Run one RPC: its reply, or its status code when that is a proper one; fails on INTERNAL/UNKNOWN."""
    try:
        return call()
    except grpc.RpcError as exc:
        code = exc.code()
        assert code not in BAD_CODES, f"{code.name}: {exc.details()}"
        return code
