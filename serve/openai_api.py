"""The OpenAI-compatible HTTP door: FastAPI routes on the same engine, cache and batch as gRPC.

A request's ``model`` names the base or a composition of registry adapters (see
:mod:`model_names`); errors come from :mod:`status`, the table the gRPC interceptor uses too. The
engine thread hands each request's chunks to the event loop (:class:`LoopEvents`), so a waiting
request holds no thread; a client that goes away mid-stream cancels its sequence, which frees its
batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from starlette.datastructures import Headers

from adapterhub.errors import ConfigError, NotFound

from .auth import Tokens
from .engine import Engine
from .errors import RequestCancelled
from .request_log import Watch
from .model_names import resolved_model, unknown_model
from .openai_errors import document_errors, install_error_handlers
from .openai_responses import Reply, error_body
from .openai_schema import AdapterAdminBody, ChatBody, CompletionBody, GenerationBody
from .status import public_message

log = logging.getLogger("adapterhub.serve.requests")

DISCONNECT_POLL_S = 0.5  # how often a unary request checks that its client is still there
DONE = format_sse_event(data_str="[DONE]")
RPC_BY_PATH = {"/v1/completions": "Completions", "/v1/chat/completions": "ChatCompletions"}


@dataclasses.dataclass
class HttpContext:
    """What the HTTP door shares with the rest of the server."""

    engine: Engine
    served_name: str
    tokens: Tokens
    metrics: Any
    serving: Callable[[], bool]  # False once the server is stopping (health says NOT_SERVING)
    max_body_bytes: int = 4 * 2**20
    workers: int = 64
    version: str = ""

    @property
    def base_names(self) -> tuple[str, ...]:  # what ``model`` may say for the base alone
        return (self.served_name, self.engine.base.name)


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


def request_timeout(header: str | None) -> float | None:
    """``X-Request-Timeout: SECONDS``, the HTTP door's deadline (gRPC clients send their own)."""
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"X-Request-Timeout {header!r}: give a positive number of seconds")
    return value


def create_app(ctx: HttpContext) -> Any:
    """The ASGI app: the routes below, behind a check that a declared body is within the limit."""
    return refuse_large_bodies(routes(ctx), ctx.max_body_bytes)


def refuse_large_bodies(app: Any, limit: int) -> Any:
    """A body whose Content-Length is over ``limit`` gets OpenAI's error shape, before a byte is read.

    FastAPI's own ``max_body_size`` (set too) stays the backstop for chunked bodies; it answers
    in plain text, and would do so for a declared length as well, from outside every handler.
    """
    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > limit:
                body = error_body(f"the request body is {length} bytes, over this server's limit of {limit} "
                                  "(--max-message-bytes)", "invalid_request_error", code="invalid_argument")
                return await JSONResponse(body, status_code=413)(scope, receive, send)
        await app(scope, receive, send)

    return guarded


def routes(ctx: HttpContext) -> FastAPI:
    engine = ctx.engine

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        # submit() and admin calls run in threads (they may load an adapter); as many as gRPC's workers
        anyio.to_thread.current_default_thread_limiter().total_tokens = ctx.workers
        yield

    docs = not ctx.tokens.enabled  # the schema describes the API: like gRPC reflection, not open behind a token
    app = FastAPI(title="adapterhub", version=ctx.version or "0", lifespan=lifespan, max_body_size=ctx.max_body_bytes,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)

    def needs(admin: bool) -> Any:
        def check(authorization: str | None = Header(default=None)) -> None:
            ctx.tokens.check(authorization, admin=admin, where="send the header")
        return Depends(check)

    inference, admin = [needs(False)], [needs(True)]

    install_error_handlers(app, metrics=ctx.metrics, counted=RPC_BY_PATH, max_body_bytes=ctx.max_body_bytes)
    document_errors(app)

    # -- health and metrics (open, like gRPC health and the metrics port) ------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = ctx.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- inference --------------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: CompletionBody, request: Request) -> Any:
        return await generate(body, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        return await generate(body, request, chat=True)

    async def generate(body: GenerationBody, request: Request, *, chat: bool) -> Any:
        watch = Watch("ChatCompletions" if chat else "Completions", ctx.metrics, door="http")
        try:
            generation = body.to_request(ctx.base_names, engine.limits)
            timeout = request_timeout(request.headers.get("x-request-timeout"))
            events = LoopEvents()
            seq = await run_in_threadpool(engine.submit, generation, timeout=timeout, stream=body.stream, events=events)
        except NotFound as exc:
            if body.adapters is None:  # the model string named it ("gpt-4o"): say what this server serves
                exc = NotFound(unknown_model(body.model, exc, ctx.served_name))
            watch.fail(exc)
            raise exc from None
        except Exception as exc:
            watch.fail(exc)
            raise
        reply = Reply(chat, resolved_model(seq.resolved, ctx.served_name), engine.base.fingerprint)
        if body.stream:
            return StreamingResponse(stream(seq, events, reply, body.include_usage, watch), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await wait_result(seq, events, request)
        except BaseException as exc:
            seq.cancel()  # no-op once finished; frees the slot when the handler itself is cancelled
            watch.fail(exc if isinstance(exc, Exception) else RequestCancelled("the request was cancelled"))
            raise
        watch.done(result)
        return reply.whole(result)

    async def wait_result(seq: Any, events: LoopEvents, request: Request) -> Any:
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

    async def stream(seq: Any, events: LoopEvents, reply: Reply, include_usage: bool, watch: Watch) -> AsyncIterator[bytes]:
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

    # -- models -----------------------------------------------------------------------------------

    started = int(time.time())

    @app.get("/v1/models", dependencies=inference)
    async def models(limit: int = Query(1000, ge=1, le=10_000), after: str | None = None) -> dict[str, Any]:
        """The base, then every version trained on it and every tag, each adapter with ``parent`` = the
        base (vLLM's convention); ``after`` = the last id of the previous page."""
        return await run_in_threadpool(list_models, limit, after)

    def list_models(limit: int, after: str | None) -> dict[str, Any]:
        base = {"id": ctx.served_name, "object": "model", "created": started, "owned_by": "adapterhub",
                "root": ctx.served_name, "parent": None}  # not engine.base.name: a directory of this server
        catalog = ((name, {"id": name, "object": "model", "created": _epoch(v.manifest.created), "owned_by": "adapterhub",
                           "root": v.ref, "parent": ctx.served_name, "method": v.method})
                   for name, v in engine.cache.source.catalog(engine.base.fingerprint))
        entries = iter([(ctx.served_name, base)])
        data, seen, more = [], after is None, False
        for name, entry in itertools.chain(entries, catalog):
            if not seen:
                seen = name == after
                continue
            if len(data) == limit:
                more = True
                break
            data.append(entry)
        if not seen:
            raise ConfigError(f"after={after!r} is not a model id of this server; pass the last id of the previous page")
        return {"object": "list", "data": data, "has_more": more}

    # -- admin (the admin token) --------------------------------------------------------------------

    @app.get("/v1/adapters", dependencies=admin)
    async def resident() -> dict[str, Any]:
        return {"object": "list", "data": [_resident(e) for e in engine.cache.snapshot()]}

    @app.post("/v1/load_lora_adapter", dependencies=admin)
    async def load(body: AdapterAdminBody) -> dict[str, Any]:
        try:
            return {"adapter": _resident(await run_in_threadpool(engine.cache.load, body.ref()))}
        except NotFound as exc:
            raise NotFound(body.not_found(exc)) from exc

    @app.post("/v1/unload_lora_adapter", dependencies=admin)
    async def unload(body: AdapterAdminBody) -> dict[str, Any]:
        ref, was = await run_in_threadpool(engine.cache.unload, body.ref())
        return {"id": ref, "was_resident": was}

    @app.post("/v1/pin_adapter", dependencies=admin)
    async def pin(body: AdapterAdminBody) -> dict[str, Any]:
        return {"adapter": _resident(await run_in_threadpool(engine.cache.set_pinned, body.ref(), True))}

    @app.post("/v1/unpin_adapter", dependencies=admin)
    async def unpin(body: AdapterAdminBody) -> dict[str, Any]:
        return {"adapter": _resident(await run_in_threadpool(engine.cache.set_pinned, body.ref(), False))}

    return app


def _resident(entry: Any) -> dict[str, Any]:
    return {"id": entry.key, "object": "adapter", "method": entry.method.name, "pinned": entry.pinned,
            "in_use": entry.in_use, "mixed_batch": entry.served is not None, "form": entry.form_kind}


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
