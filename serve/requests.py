"""Domain objects of a generation request, validated before they reach the engine.

The servicer turns protobuf into these; the engine never sees protobuf. Every limit a client can
exceed raises ``LimitExceeded`` / ``ConfigError`` (INVALID_ARGUMENT) naming the field and the limit.
"""

from __future__ import annotations

import dataclasses
import math

from adapterhub.errors import ConfigError, LimitExceeded

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_WEIGHT = 10.0
CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Server-side limits (set on the command line)."""

    max_new_tokens: int = 512
    max_adapters_per_request: int = 4
    context_length: int = 512


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    ref: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Either a raw prompt or chat messages, plus adapters and sampling parameters."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    adapters: tuple[AdapterSpec, ...]
    params: SamplingParams

    @classmethod
    def build(
        cls,
        *,
        prompt: str = "",
        messages: list[tuple[str, str]] | None = None,
        adapters: list[tuple[str, float]] | None = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        limits: Limits = Limits(),
    ) -> "GenerationRequest":
        """Validate raw field values (0 = default, as in the proto) into a request."""
        messages = list(messages or [])
        if prompt and messages:
            raise ConfigError("set either prompt or messages, not both")
        if not prompt and not messages:
            raise ConfigError("the request is empty: set prompt (raw text) or messages (chat turns)")
        for i, (role, _content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise ConfigError(f"messages[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        specs = []
        for i, (ref, weight) in enumerate(adapters or []):
            weight = 1.0 if weight == 0 else float(weight)
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise LimitExceeded(f"adapters[{i}] ({ref}): weight {weight} must be finite and within ±{MAX_WEIGHT}")
            specs.append(AdapterSpec(ref=ref, weight=weight))
        if len(specs) > limits.max_adapters_per_request:
            raise LimitExceeded(
                f"the request names {len(specs)} adapters; this server composes at most "
                f"{limits.max_adapters_per_request} per request (--max-adapters-per-request)"
            )
        max_new = max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
        if max_new > limits.max_new_tokens:
            raise LimitExceeded(f"max_new_tokens {max_new} is over this server's limit of {limits.max_new_tokens}")
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 10.0):
            raise LimitExceeded(f"temperature {temperature} must be in [0, 10] (0 = greedy)")
        top_p = 1.0 if top_p == 0 else top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise LimitExceeded(f"top_p {top_p} must be in (0, 1] (0 = off)")
        stop = list(stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
            raise LimitExceeded(
                f"stop: at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_LENGTH} characters each"
            )
        return cls(
            prompt=prompt or None,
            messages=tuple(messages) or None,
            adapters=tuple(specs),
            params=SamplingParams(max_new, float(temperature), float(top_p), int(seed), tuple(stop)),
        )


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    requested: str
    resolved: str  # "task@N"
    method: str
    weight: float


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "eos", "stop"
    adapters: list[ResolvedAdapter]
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Chunk:
    """A streamed step: new text and ids; ``result`` is set on the last chunk."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None
