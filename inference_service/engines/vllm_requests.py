"""What a request becomes in vLLM and what comes back: sampling parameters, structured
output and per-token logprobs (`VllmEngine` calls these; vLLM is imported lazily)."""

from __future__ import annotations

import json
from typing import Any

from inference_service.engines.base import StructuredOutputSpec, TokenLogprob
from inference_service.sampling import DEFAULT_MAX_TOKENS, SamplingSpec
from server_kit.errors import FieldViolation, InvalidArgument


def sampling_params(spec: SamplingSpec, structured: StructuredOutputSpec | None) -> Any:
    """vLLM's `SamplingParams` for our sampling spec, streaming deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {
        "output_kind": RequestOutputKind.DELTA,
        "max_tokens": spec.max_tokens if spec.max_tokens is not None else DEFAULT_MAX_TOKENS,
    }
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "n",
        "logprobs",
        "ignore_eos",
    ):
        value = getattr(spec, name)
        if value is not None:
            kwargs[name] = value
    if spec.top_k is not None:
        kwargs["top_k"] = 0 if spec.top_k == -1 else spec.top_k  # vLLM: 0 (or -1) is "off"
    if spec.stop:
        kwargs["stop"] = list(spec.stop)
    if spec.stop_token_ids:
        kwargs["stop_token_ids"] = list(spec.stop_token_ids)
    if structured is not None:
        kwargs["structured_outputs"] = structured_outputs_params(structured)
    return SamplingParams(**kwargs)


def structured_outputs_params(spec: StructuredOutputSpec) -> Any:
    """vLLM's structured-output request for ours; a malformed one is INVALID_ARGUMENT."""
    from vllm.sampling_params import StructuredOutputsParams

    kind = spec.kind()
    if kind == "json_schema":
        try:
            json.loads(spec.json_schema or "")
        except ValueError as exc:
            raise InvalidArgument(
                f"json_schema is not valid JSON: {exc}",
                reason="INVALID_STRUCTURED_OUTPUT",
                violations=[FieldViolation("structured_output.json_schema", "must be a JSON document")],
            ) from exc
        return StructuredOutputsParams(json=spec.json_schema)
    if kind == "regex":
        return StructuredOutputsParams(regex=spec.regex)
    if not spec.choice:
        raise InvalidArgument(
            "choice needs at least one string",
            reason="INVALID_STRUCTURED_OUTPUT",
            violations=[FieldViolation("structured_output.choice", "must not be empty")],
        )
    return StructuredOutputsParams(choice=list(spec.choice))


def token_logprobs(raw: Any, token_ids: tuple[int, ...], requested: int | None) -> tuple[TokenLogprob, ...]:
    """Our `TokenLogprob` per generated token from vLLM's per-position dicts."""
    if requested is None or not raw:
        return ()
    result = []
    for token_id, position in zip(token_ids, raw, strict=False):
        chosen = position.get(token_id)
        if chosen is None:  # pragma: no cover - vLLM always includes the sampled token
            continue
        ranked = sorted(
            ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= requested),
            key=lambda item: item[1].rank,
        )
        top = tuple(TokenLogprob(tid, float(lp.logprob), lp.decoded_token or "") for tid, lp in ranked)
        result.append(TokenLogprob(token_id, float(chosen.logprob), chosen.decoded_token or "", top))
    return tuple(result)
