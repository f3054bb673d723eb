"""Protobuf <-> domain objects; the only place that knows both."""

from __future__ import annotations

from typing import Any

from ._proto import admin_pb2, inference_pb2
from .requests import GenerationRequest, GenerationResult, Limits


def request_from_proto(msg: inference_pb2.GenerateRequest, limits: Limits) -> GenerationRequest:
    return GenerationRequest.build(
        prompt=msg.prompt,
        messages=[(m.role, m.content) for m in msg.messages],
        adapters=[(a.ref, a.weight or None) for a in msg.adapters],  # proto3: 0 is unset, which means 1
        max_new_tokens=msg.max_new_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
        seed=msg.seed,
        stop=list(msg.stop),
        limits=limits,
    )


def _resolved(result: GenerationResult) -> list[inference_pb2.ResolvedAdapter]:
    return [inference_pb2.ResolvedAdapter(requested=a.requested, resolved=a.resolved, method=a.method, weight=a.weight)
            for a in result.adapters]


def response_to_proto(result: GenerationResult) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason, adapters=_resolved(result),
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)


def chunk_to_proto(chunk: Any) -> inference_pb2.GenerateChunk:
    msg = inference_pb2.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.result is not None:
        r = chunk.result
        msg.finish_reason = r.finish_reason
        msg.adapters.extend(_resolved(r))
        msg.prompt_tokens, msg.completion_tokens = r.prompt_tokens, r.completion_tokens
    return msg


def resident_to_proto(entry: Any) -> admin_pb2.ResidentAdapter:
    return admin_pb2.ResidentAdapter(ref=entry.key, method=entry.method.name, pinned=entry.pinned,
                                     mixed_batch=entry.served is not None, in_use=entry.in_use, form=entry.form_kind)
