"""The OpenAI-compatible HTTP door: FastAPI routes on the same engine, cache and batch as gRPC.

Like the gRPC servicers, the routes only translate: a body becomes an engine request (:mod:`openai_schema`),
a result becomes OpenAI's response (:mod:`openai_responses`). Waiting and streaming are
:mod:`openai_stream`'s, the model list's paging :mod:`openai_models`'s, the adapter admin
:mod:`openai_admin`'s; errors come from :mod:`openai_errors` over :mod:`status`, the table the gRPC
interceptor uses too. A request's ``model`` names the base or a composition of registry adapters
(see :mod:`model_names`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import anyio.to_thread
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from adapterhub.errors import ConfigError, NotFound

from .auth import Tokens
from .engine import Engine
from .errors import RequestCancelled
from .model_names import resolved_model, unknown_model
from .openai_admin import admin_routes
from .openai_errors import document_errors, install_error_handlers
from .openai_models import list_models
from .openai_responses import Reply, error_body
from .openai_schema import ChatBody, CompletionBody, GenerationBody
from .openai_stream import LoopEvents, sse_stream, wait_result
from .request_log import Watch

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

    inference = [needs(False)]

    install_error_handlers(app, metrics=ctx.metrics, counted=RPC_BY_PATH, max_body_bytes=ctx.max_body_bytes)
    document_errors(app)

    # -- health and metrics (open, like gRPC health and the metrics port) ------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = ctx.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
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
            return StreamingResponse(sse_stream(seq, events, reply, body.include_usage, watch),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await wait_result(seq, events, request)
        except BaseException as exc:
            seq.cancel()  # no-op once finished; frees the slot when the handler itself is cancelled
            watch.fail(exc if isinstance(exc, Exception) else RequestCancelled("the request was cancelled"))
            raise
        watch.done(result)
        return reply.whole(result)

    # -- models and admin ---------------------------------------------------------------------------

    started = int(time.time())

    @app.get("/v1/models", dependencies=inference)
    async def models(limit: int = Query(1000, ge=1, le=10_000), after: str | None = None) -> dict[str, Any]:
        """The base, then every version trained on it and every tag, each adapter with ``parent`` = the
        base (vLLM's convention); ``after`` = the last id of the previous page."""
        return await run_in_threadpool(list_models, engine.cache.source, engine.base.fingerprint, ctx.served_name,
                                       started, limit, after)

    app.include_router(admin_routes(engine.cache, [needs(True)]))
    return app
