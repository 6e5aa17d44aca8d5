"""The dry run of `CheckCompatibility`: ask an inference worker whether its engines would load a model.

`DryRun.run(worker, model)` calls the worker's
`modelyard.inference.v1.InferenceService/LoadModel` with `validate_only` at
`worker.address` (the catalog's client TLS and service token, a bounded
deadline). The worker runs its compatibility rules and each engine's dry run
(its configuration for the model, no weights loaded) and reports what each
engine said to the catalog (`ReportEngineOutcome`) before it answers, so the
check that follows sees those outcomes through the `observed` rule.

The answer becomes a `dry_run` rule result:

- PASS: the worker's engines validated the model (the message names the engine
  that would serve it);
- FAIL: the worker answered FAILED_PRECONDITION, the expected answer for a
  model that does not load there (the message is the worker's);
- WARN: anything else (nothing listens at the address, the deadline passed,
  the worker refused the call, an older worker without dry runs): the dry run
  says nothing about the model, and the rest of the report stands.

This is the catalog's only call out to a worker; it stays out of the servicer
(which only translates) and out of `compatibility` (pure domain code).
"""

from __future__ import annotations

import logging

import grpc

from clients.channel import TlsConfig, call_metadata, open_aio_channel
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import worker_pb2
from modelyard.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

log = logging.getLogger("modelyard.catalog")

INFERENCE_SERVICE = "modelyard.inference.v1.InferenceService"
DRY_RUN_RULE = "dry_run"
DRY_RUN_TIMEOUT_SECONDS = 60.0
"""Longest the catalog waits for a worker's dry run (engines build their configuration, no weights)."""


def _result(outcome: worker_pb2.RuleOutcome.ValueType, message: str) -> worker_pb2.RuleResult:
    return worker_pb2.RuleResult(rule=DRY_RUN_RULE, outcome=outcome, message=message)


class DryRun:
    """Calls inference workers' `LoadModel(validate_only=True)` for the catalog.

    `tls`: TLS for the call (None: plaintext), as `CommonSettings.client_tls()` gives it;
    `token`: the bearer token sent (`MODELYARD_SERVICE_TOKEN`; with tokens on, the
    inference server allows LoadModel to `admin` tokens only);
    `timeout`: the call's deadline in seconds.
    """

    def __init__(
        self,
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        timeout: float = DRY_RUN_TIMEOUT_SECONDS,
    ) -> None:
        self.tls = tls
        self.token = token
        self.timeout = timeout

    async def run(self, worker: worker_pb2.Worker, model: str) -> worker_pb2.RuleResult:
        """The `dry_run` result of asking `worker` whether it would load `model` (`models/{model}`)."""
        if not worker.address:
            return _result(
                worker_pb2.RULE_OUTCOME_WARN,
                f"no dry run: {worker.name} registered no address to call",
            )
        channel = open_aio_channel(worker.address, INFERENCE_SERVICE, self.tls)
        try:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            request = inference_service_pb2.LoadModelRequest(model=model, validate_only=True)
            response = await stub.LoadModel(request, timeout=self.timeout, metadata=call_metadata(self.token))
        except grpc.RpcError as rpc_error:
            error = ModelyardRpcError.from_rpc_error(rpc_error)
            if error.code == grpc.StatusCode.FAILED_PRECONDITION:
                return _result(
                    worker_pb2.RULE_OUTCOME_FAIL, f"{worker.name} would not load it: {error.message}"
                )
            log.info("dry run of %s on %s (%s) failed: %s", model, worker.name, worker.address, error)
            reason = f" [{error.reason}]" if error.reason else ""
            return _result(
                worker_pb2.RULE_OUTCOME_WARN,
                f"no dry run: {worker.name} at {worker.address} answered {error.code.name}{reason}: "
                f"{error.message}",
            )
        finally:
            await channel.close()
        return _result(worker_pb2.RULE_OUTCOME_PASS, _validated(response))


def _validated(response: inference_service_pb2.LoadModelResponse) -> str:
    """`the worker's engines validated it: ENGINE` from a validate_only answer."""
    engine = response.loaded_model.engine
    if not engine:
        engine = ", ".join(dict.fromkeys(o.engine for o in response.outcomes if o.supported and o.engine))
    return f"the worker's engines validated it: {engine or 'engine not named'}"


__all__ = ["DRY_RUN_RULE", "DRY_RUN_TIMEOUT_SECONDS", "DryRun"]
