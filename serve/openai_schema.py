"""Request bodies of the OpenAI HTTP API, validated by pydantic, turned into engine requests.

Unknown fields are refused (a typo must not be silently ignored), and fields OpenAI defines but
this server does not implement are refused when set to anything but their neutral value, each
error naming the field. Defaults follow OpenAI (temperature 1, top_p 1, a random seed), except
that ``max_tokens`` left out means the server's default (64, as on gRPC).
"""

from __future__ import annotations

import secrets
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterhub.chat import ROLES
from adapterhub.errors import ConfigError

from .model_names import parse_model
from .requests import HTTP_FIELDS, GenerationRequest, Limits


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class AdapterItem(Strict):
    """One entry of the ``adapters`` extension field (``extra_body`` in the openai client)."""

    ref: str
    weight: float = 1.0


# OpenAI's other names for a role ("developer" is its newer name for the system role)
ROLE_ALIASES = {"developer": "system"}
# what a message's role may say on the wire: each of the chat roles, then its OpenAI aliases
WIRE_ROLES = tuple(name for role in ROLES for name in (role, *(a for a, to in ROLE_ALIASES.items() if to == role)))


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal[WIRE_ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart]
    name: str | None = None  # accepted, as OpenAI does; chat templates have no place for it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# field -> its neutral value: anything else is refused as unsupported
UNSUPPORTED: dict[str, Any] = {"n": 1, "best_of": None, "echo": False, "logprobs": None, "top_logprobs": None,
                               "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "suffix": None,
                               "tools": None, "tool_choice": None, "response_format": None}


class GenerationBody(Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI uses it only for abuse monitoring
    adapters: list[AdapterItem] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "GenerationBody":
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, neutral)
            if value != neutral and not (name == "logprobs" and value is False) \
                    and not (name == "response_format" and value == {"type": "text"}):
                raise ValueError(f"{name}={value!r} is not supported by this server (leave it out)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    def adapter_list(self, base_names: Sequence[str]) -> list[tuple[str, float]]:
        named = parse_model(self.model, base_names)
        if self.adapters is None:
            return named
        if named:
            raise ConfigError(f"model {self.model!r} names adapters and the 'adapters' field lists more; "
                              f"use one: model = the base ({base_names[0]!r}) with 'adapters', or a composition in model")
        return [(a.ref, a.weight) for a in self.adapters]

    def build(self, base_names: Sequence[str], limits: Limits, max_tokens: int | None, **text: Any) -> GenerationRequest:
        temperature = 1.0 if self.temperature is None else self.temperature
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationRequest.build(
            **text, adapters=self.adapter_list(base_names), max_new_tokens=max_tokens or 0,
            temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p, seed=seed, stop=stop,
            limits=limits, fields=HTTP_FIELDS)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(GenerationBody):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def to_request(self, base_names: Sequence[str], limits: Limits) -> GenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ConfigError(f"prompt: a list of {len(prompt)} prompts; send one prompt per request")
            prompt = prompt[0]
        return self.build(base_names, limits, self.max_tokens, prompt=prompt)


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def to_request(self, base_names: Sequence[str], limits: Limits) -> GenerationRequest:
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ConfigError("max_tokens and max_completion_tokens differ; set one")
        messages = [(ROLE_ALIASES.get(m.role, m.role), m.text()) for m in self.messages]
        return self.build(base_names, limits, self.max_completion_tokens or self.max_tokens, messages=messages)


class AdapterAdminBody(Strict):
    """Admin calls name one registry reference; ``lora_name`` is vLLM's field name for it.

    The other fields are the ones Kubernetes routers send with vLLM's body (the Inference
    Extension's LoRA sidecar, production-stack, AIBrix): accepted so those calls succeed, and not
    read. ``lora_path`` in particular: the adapter comes from this server's registry, checked
    against its hashes and this base's fingerprint, never from a path a caller names.
    """

    adapter: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    base_model_name: str | None = None
    lora_int_id: int | None = None

    def ref(self) -> str:
        ref = self.adapter or self.lora_name
        if not ref or (self.adapter and self.lora_name and self.adapter != self.lora_name):
            raise ConfigError("name one adapter: {\"adapter\": \"task@version\"} (or vLLM's \"lora_name\")")
        return ref

    def not_found(self, exc: Exception) -> str:
        """The registry's message, plus why ``lora_path`` did not help where one was sent."""
        if self.lora_path is None:
            return str(exc)
        return (f"{exc}; lora_path is not read: this server loads lora_name from its registry, so publish the "
                f"directory (`adapterhub registry import DIR --task TASK`) and send lora_name 'task@version'")
