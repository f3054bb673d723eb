"""Domain objects of a generation request, validated before they reach the engine.

The servicer turns protobuf into these; the engine never sees protobuf. Every limit a client can
exceed raises ``LimitExceeded`` / ``ConfigError`` (INVALID_ARGUMENT) naming the field, by the name
of the door it came through (:class:`FieldNames`), and the limit.
"""

from __future__ import annotations

import dataclasses
import math

from adapterhub.chat import ROLES
from adapterhub.errors import ConfigError, LimitExceeded

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_WEIGHT = 10.0
# Below these, sampling is the top token in all but name, and float32 turns the value into 0 (a
# temperature of 1e-50 divides by zero; a top_p of 1e-300 keeps no token): send 0 for greedy.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6
MAX_TEMPERATURE = 10.0
SEED_RANGE = (-(2**63), 2**64)  # what a 64-bit seed holds, signed or not (gRPC's is a uint64)


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """What each door calls a request's fields: one table, so an error names the field the client sent."""

    max_new_tokens: str = "max_new_tokens"
    temperature: str = "temperature"
    top_p: str = "top_p"
    seed: str = "seed"
    stop: str = "stop"
    prompt: str = "prompt"
    messages: str = "messages"
    adapters: str = "adapters"


GRPC_FIELDS = FieldNames()
HTTP_FIELDS = FieldNames(max_new_tokens="max_tokens")


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
    fields: FieldNames = dataclasses.field(default=GRPC_FIELDS, compare=False)  # for the engine's errors

    @classmethod
    def build(
        cls,
        *,
        prompt: str = "",
        messages: list[tuple[str, str]] | None = None,
        adapters: list[tuple[str, float | None]] | None = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        limits: Limits = Limits(),
        fields: FieldNames = GRPC_FIELDS,
    ) -> "GenerationRequest":
        """Validate raw field values (0 = default, as in the proto; a weight of None = 1) into a request."""
        f = fields
        messages = list(messages or [])
        if prompt and messages:
            raise ConfigError(f"set either {f.prompt} or {f.messages}, not both")
        if not prompt and not messages:
            raise ConfigError(f"the request is empty: set {f.prompt} (raw text) or {f.messages} (chat turns)")
        _check_text(f.prompt, prompt or "")
        for i, (role, content) in enumerate(messages):
            if role not in ROLES:
                raise ConfigError(f"{f.messages}[{i}].role {role!r} is not one of {', '.join(ROLES)}")
            _check_text(f"{f.messages}[{i}].content", content)
        specs = []
        for i, (ref, weight) in enumerate(adapters or []):
            _check_text(f"{f.adapters}[{i}]", ref)
            weight = 1.0 if weight is None else float(weight)
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT or weight == 0:
                raise LimitExceeded(f"{f.adapters}[{i}] ({ref}): weight {weight} must be finite, non-zero and "
                                    f"within ±{MAX_WEIGHT} (a weight of 0 turns the adapter off: leave it out)")
            specs.append(AdapterSpec(ref=ref, weight=weight))
        if len(specs) > limits.max_adapters_per_request:
            raise LimitExceeded(
                f"the request names {len(specs)} adapters; this server composes at most "
                f"{limits.max_adapters_per_request} per request (--max-adapters-per-request)"
            )
        max_new = max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
        if max_new > limits.max_new_tokens:
            raise LimitExceeded(f"{f.max_new_tokens} {max_new} is over this server's limit of {limits.max_new_tokens}")
        if not (math.isfinite(temperature) and (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)):
            raise LimitExceeded(f"{f.temperature} {temperature} must be 0 (greedy) or in "
                                f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        top_p = 1.0 if top_p == 0 else top_p
        if not (math.isfinite(top_p) and MIN_TOP_P <= top_p <= 1.0):
            raise LimitExceeded(f"{f.top_p} {top_p} must be in [{MIN_TOP_P:g}, 1] (0 = off)")
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise LimitExceeded(f"{f.seed} {seed} does not fit in 64 bits: use an integer in [-2**63, 2**64)")
        stop = list(stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
            raise LimitExceeded(
                f"{f.stop}: at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_LENGTH} characters each"
            )
        for i, text in enumerate(stop):
            _check_text(f"{f.stop}[{i}]", text)
        return cls(
            prompt=prompt or None,
            messages=tuple(messages) or None,
            adapters=tuple(specs),
            params=SamplingParams(max_new, float(temperature), float(top_p), int(seed), tuple(stop)),
            fields=fields,
        )


def _check_text(field: str, text: str) -> None:
    """Refuse a lone surrogate (JSON lets ``"\\ud800"`` through; no tokenizer or UTF-8 encoder takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{field}: character {exc.start} is a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}), "
                          "which is not text; send whole characters (a surrogate pair is fine)") from None


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
