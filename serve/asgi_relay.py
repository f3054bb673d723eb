"""Call an ASGI app in this process and hand its response on as it comes: a head, then body chunks.

A Ray Serve replica answers through the HTTP door's own app (the same routes, schemas, errors and
SSE framing as ``adapterhub serve --http-port``) without binding a port: the ingress sends it the
request's method, path, headers and body, and streams back what this relay yields. httpx's
``ASGITransport`` would do the call but buffers the whole response, which a stream cannot wait for.

When the consumer stops early (the client went away, the ingress cancelled), the app sees
``http.disconnect`` and is cancelled, so the door frees the request's batch slot as it does for a
socket that closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, AsyncIterator

_END = object()


@dataclasses.dataclass(frozen=True)
class Head:
    """The response's status and headers (latin-1 strings, as HTTP has them)."""

    status: int
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def streams(self) -> bool:
        return (self.header("content-type") or "").startswith("text/event-stream")


async def start_lifespan(app: Any) -> asyncio.Task:
    """Run the app's startup (the door sizes its thread pool there); the task holds it open."""
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    shutdown = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "lifespan.startup"}
        await shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict) -> None:
        if message["type"].startswith("lifespan.startup") and not started.done():
            started.set_result(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, receive, send))
    message = await started
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the HTTP app did not start: {message.get('message', message['type'])}")
    return task


async def relay(app: Any, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                body: bytes) -> AsyncIterator[Head | bytes]:
    """Yield the response's :class:`Head`, then each non-empty body chunk as the app sends it."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("the consumer went away")  # what a server does for a closed socket (ASGI 2.4)
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(_END)

    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": raw, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}
    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message is _END:
                break
            if message["type"] == "http.response.start":
                yield Head(message["status"], tuple((k.decode("latin-1"), v.decode("latin-1"))
                                                    for k, v in message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
