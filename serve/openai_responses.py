"""OpenAI response bodies and stream chunks from engine results (plain dicts; FastAPI encodes them)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .requests import GenerationResult

# adapterhub's finish reasons -> OpenAI's ("eos" and a stop string are both "stop" there)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class Reply:
    """One response's identity (id, created, model) and how its choices look, for either endpoint."""

    def __init__(self, chat: bool, model: str, fingerprint: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **extra}

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH[result.finish_reason]}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage=usage(result))

    def chunk(self, text: str | None, finish: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """A stream chunk: new text, or (``finish``) the last choice chunk; the chat stream's first
        chunk carries the assistant role, as OpenAI's does."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH.get(finish) if finish else None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        """The extra last chunk ``stream_options.include_usage`` asks for: no choices, the usage."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(result))


def error_body(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
