"""How the HTTP door waits for a sequence: its events on the event loop, an SSE stream, or the
final result while the client is still there.

The engine thread hands each request's chunks to the loop (:class:`LoopEvents`), so a waiting
request holds no thread. A client that goes away (mid-stream, or while a unary request waits)
cancels its sequence, which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.sse import format_sse_event

from .errors import RequestCancelled
from .openai_responses import Reply, error_body
from .request_log import Watch
from .requests import GenerationResult
from .status import public_message

DISCONNECT_POLL_S = 0.5  # how often a unary request checks that its client is still there
DONE = format_sse_event(data_str="[DONE]")


class LoopEvents:
    """A sequence's event queue read on the event loop: the engine thread puts, never blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: the server stopped and nobody reads any more
            pass

    async def get(self) -> Any:
        return await self.queue.get()


def sse(obj: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


async def wait_result(seq: Any, events: LoopEvents, request: Request) -> GenerationResult:
    """The sequence's result; RequestCancelled once the client has disconnected (polled)."""
    while True:
        try:
            item = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise RequestCancelled(f"request {seq.id}: the client disconnected") from None
            continue
        if isinstance(item, BaseException):
            raise item
        if item.result is not None:
            return item.result


async def sse_stream(seq: Any, events: LoopEvents, reply: Reply, include_usage: bool,
                     watch: Watch) -> AsyncIterator[bytes]:
    """The sequence's chunks as OpenAI's SSE events, ending in ``[DONE]``; an error after the 200
    went out is the stream's last event."""
    finished = False
    try:
        if reply.chat:
            yield sse(reply.chunk(None, first=True))
        while True:
            item = await events.get()
            if isinstance(item, BaseException):
                raise item
            if item.text:
                yield sse(reply.chunk(item.text))
            if item.result is not None:
                yield sse(reply.chunk(None, item.result.finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(item.result))
                yield DONE
                finished = True
                watch.done(item.result)
                return
    except Exception as exc:  # after the 200 went out: the error is the stream's last event
        finished = True
        status = watch.fail(exc)
        yield sse(error_body(public_message(exc, status), status.kind, code=status.name.lower()))
    finally:
        if not finished:  # the client went away (Starlette cancelled us): free the batch slot
            seq.cancel()
            watch.fail(RequestCancelled(f"request {seq.id}: the client disconnected mid-stream"))
