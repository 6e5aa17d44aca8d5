"""Sampling parameters: validation (with one field violation per bad field) and defaults.

`validate_sampling` checks a `SamplingSpec` against the ranges of the proto
``SamplingParams`` and the prompt against the context length; `resolve_defaults` fills
the fields a request left unset from the model's ``generation_config.json`` (as the
catalog records them, or as `GenerationDefaults.from_model_dir` reads them).  Fields still
unset after that take the engine's defaults (`ENGINE_DEFAULTS`, vLLM's).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from server_kit.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of a request; ``None`` (or empty) means "not set".

    The fields and ranges of the proto ``SamplingParams``.  Unset fields take the model's
    defaults (`resolve_defaults`) and then the engine's (`ENGINE_DEFAULTS`).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    logprobs: int | None = None
    ignore_eos: bool | None = None


DEFAULT_MAX_TOKENS = 16
"""``max_tokens`` of a request that sets none (as vLLM and the proto)."""

MAX_N = 16
"""Most completions one request may ask for."""

MAX_LOGPROBS = 20
"""Most log probabilities per token one request may ask for."""

ENGINE_DEFAULTS = SamplingSpec(
    temperature=1.0,
    top_p=1.0,
    top_k=-1,
    min_p=0.0,
    max_tokens=DEFAULT_MAX_TOKENS,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    n=1,
    ignore_eos=False,
)
"""What an unset field means once the model's defaults were applied (vLLM's defaults)."""


def _bad_float(value: float) -> bool:
    return math.isnan(value) or math.isinf(value)


def sampling_violations(
    spec: SamplingSpec, *, field_prefix: str = "sampling", vocab_size: int | None = None
) -> list[FieldViolation]:
    """Every out-of-range field of ``spec`` (empty when all are fine)."""
    violations: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        violations.append(FieldViolation(f"{field_prefix}.{name}", description))

    if spec.temperature is not None and (_bad_float(spec.temperature) or spec.temperature < 0):
        bad("temperature", f"must be >= 0 (0 is greedy), got {spec.temperature}")
    if spec.top_p is not None and (_bad_float(spec.top_p) or not 0 < spec.top_p <= 1):
        bad("top_p", f"must be in (0, 1], got {spec.top_p}")
    if spec.top_k is not None and (spec.top_k == 0 or spec.top_k < -1):
        bad("top_k", f"must be -1 (off) or >= 1, got {spec.top_k}")
    if spec.min_p is not None and (_bad_float(spec.min_p) or not 0 <= spec.min_p <= 1):
        bad("min_p", f"must be in [0, 1], got {spec.min_p}")
    if spec.max_tokens is not None and spec.max_tokens < 1:
        bad("max_tokens", f"must be >= 1, got {spec.max_tokens}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(spec, name)
        if value is not None and (_bad_float(value) or not -2 <= value <= 2):
            bad(name, f"must be in [-2, 2], got {value}")
    if spec.repetition_penalty is not None and (
        _bad_float(spec.repetition_penalty) or spec.repetition_penalty <= 0
    ):
        bad("repetition_penalty", f"must be > 0 (1 is none), got {spec.repetition_penalty}")
    if spec.n is not None and not 1 <= spec.n <= MAX_N:
        bad("n", f"must be in [1, {MAX_N}], got {spec.n}")
    if spec.logprobs is not None and not 0 <= spec.logprobs <= MAX_LOGPROBS:
        bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {spec.logprobs}")
    if spec.seed is not None and spec.seed < 0:
        bad("seed", f"must be >= 0, got {spec.seed}")
    for i, stop in enumerate(spec.stop):
        if not stop:
            bad(f"stop[{i}]", "must not be empty")
    for i, token_id in enumerate(spec.stop_token_ids):
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            limit = f" and < {vocab_size}" if vocab_size is not None else ""
            bad(f"stop_token_ids[{i}]", f"must be >= 0{limit}, got {token_id}")
    return violations


def validate_sampling(
    spec: SamplingSpec,
    *,
    max_model_len: int,
    prompt_tokens: int,
    field_prefix: str = "sampling",
    vocab_size: int | None = None,
) -> None:
    """Raise InvalidArgument when ``spec`` or the prompt cannot be served.

    Out-of-range sampling values: reason ``INVALID_SAMPLING_PARAMS`` with one field
    violation per bad field (``{field_prefix}.top_p`` ...).  An empty prompt:
    ``EMPTY_PROMPT``.  A prompt that leaves no room for one generated token
    (``prompt_tokens >= max_model_len``): ``PROMPT_TOO_LONG`` with ``prompt_tokens`` and
    ``max_model_len`` in the metadata and the message.
    """
    violations = sampling_violations(spec, field_prefix=field_prefix, vocab_size=vocab_size)
    if violations:
        fields = ", ".join(v.field for v in violations)
        raise InvalidArgument(
            f"invalid sampling parameters: {fields}",
            reason="INVALID_SAMPLING_PARAMS",
            violations=violations,
        )
    if prompt_tokens <= 0:
        raise InvalidArgument(
            "the prompt is empty",
            reason="EMPTY_PROMPT",
            violations=[FieldViolation("prompt", "must contain at least one token")],
        )
    if prompt_tokens >= max_model_len:
        message = (
            f"the prompt has {prompt_tokens} tokens but the model's context is {max_model_len} tokens "
            f"(prompt plus at least one generated token must fit); shorten the prompt"
        )
        raise InvalidArgument(
            message,
            reason="PROMPT_TOO_LONG",
            metadata={"prompt_tokens": prompt_tokens, "max_model_len": max_model_len},
            violations=[FieldViolation("prompt", message)],
        )


def resolve_defaults(
    spec: SamplingSpec,
    *,
    default_temperature: float | None = None,
    default_top_p: float | None = None,
    default_top_k: int | None = None,
    default_repetition_penalty: float | None = None,
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> SamplingSpec:
    """``spec`` with its unset fields taken from the model's defaults.

    Only fields the request left unset (``None``) change; a default that is ``None``
    (unknown) leaves the field unset, for the engine's own default.
    """
    updates: dict[str, object] = {}
    for name, default in (
        ("temperature", default_temperature),
        ("top_p", default_top_p),
        ("top_k", default_top_k),
        ("repetition_penalty", default_repetition_penalty),
        ("max_tokens", default_max_tokens),
    ):
        if getattr(spec, name) is None and default is not None:
            updates[name] = default
    return dataclasses.replace(spec, **updates) if updates else spec  # type: ignore[arg-type]


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a model ships in ``generation_config.json`` (``None``: absent).

    As vLLM, only explicit values count (``do_sample`` is not read: a model that wants
    greedy decoding by default sets ``temperature`` 0 or callers do).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> GenerationDefaults:
        """Read ``generation_config.json`` of ``model_dir`` (no file: no defaults)."""
        path = Path(model_dir) / "generation_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(config, dict):
            return cls()

        def number(key: str) -> float | None:
            value = config.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        top_k = number("top_k")
        return cls(
            temperature=number("temperature"),
            top_p=number("top_p"),
            # transformers' default top_k is 50 even when unset; only an explicit one counts.
            top_k=int(top_k) if top_k is not None and top_k > 0 else None,
            repetition_penalty=number("repetition_penalty"),
        )

    def apply(
        self, spec: SamplingSpec, *, default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    ) -> SamplingSpec:
        """`resolve_defaults` with these defaults."""
        return resolve_defaults(
            spec,
            default_temperature=self.temperature,
            default_top_p=self.top_p,
            default_top_k=self.top_k,
            default_repetition_penalty=self.repetition_penalty,
            default_max_tokens=default_max_tokens,
        )
