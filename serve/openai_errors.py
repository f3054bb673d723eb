"""The HTTP door's errors: OpenAI's shape, statuses from :mod:`status` (the table the gRPC
interceptor uses too), and an OpenAPI schema that documents the 400 this door sends (FastAPI's
default documents a 422 ``HTTPValidationError`` that it never sends here)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from adapterhub.errors import AdapterHubError

from .openai_responses import error_body
from .status import INTERNAL, Status, public_message, status_for

log = logging.getLogger("adapterhub.serve.requests")

RETRY_AFTER_S = "1"  # a stopping server's hint: a replica (or this one, restarted) answers in a moment


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error this door sends, whatever its status (OpenAI's shape)."""

    error: ErrorDetail


class ErrorJSON(JSONResponse):
    """JSON that renders whatever a message echoes: a lone surrogate from a request body cannot be
    encoded as UTF-8, and must not turn a 400 into a 500; it is sent escaped instead."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(exc: BaseException, status: Status | None = None) -> JSONResponse:
    status = status or status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status.http == 401 else {}
    if status.http == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    body = error_body(public_message(exc, status), status.kind, code=status.name.lower())
    return ErrorJSON(body, status_code=status.http, headers=headers or None)


def install_error_handlers(app: FastAPI, *, metrics: Any, counted: dict[str, str], max_body_bytes: int) -> None:
    """Every error in OpenAI's shape; ``counted`` maps the inference paths to the names their
    invalid bodies are counted under."""

    @app.exception_handler(AdapterHubError)
    async def domain_error(_request: Request, exc: AdapterHubError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_describe(e) for e in exc.errors()]
        message = "; ".join(p for _, p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        content_type = request.headers.get("content-type", "")
        if content_type and not content_type.split(";")[0].strip().lower().endswith("json"):  # never parsed
            problems.insert(0, ("body", ""))
            message = (f"the body must be JSON sent with Content-Type: application/json (this request says "
                       f"{content_type or 'none'!r})")
        if request.url.path in counted and metrics is not None:
            metrics.request(counted[request.url.path], "INVALID_ARGUMENT", 0.0, None)
        body = error_body(message, "invalid_request_error", param=problems[0][0] if problems else None,
                          code="invalid_argument")
        return ErrorJSON(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: f"no route {request.method} {request.url.path}; the API is under /v1 "
                         "(/v1/models, /v1/completions, /v1/chat/completions)",
                    405: f"{request.method} is not allowed on {request.url.path}",
                    413: f"the request body is over this server's limit of {max_body_bytes} bytes "
                         "(--max-message-bytes)"}
        kind = {404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return ErrorJSON(error_body(messages.get(exc.status_code, str(exc.detail)), kind),
                         status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("http=%s status=INTERNAL", request.url.path, exc_info=exc)
        return error_response(exc, INTERNAL)


def document_errors(app: FastAPI) -> None:
    """OpenAPI as this door answers: a route FastAPI documents with a 422 ``HTTPValidationError``
    gets a 400 ``ErrorResponse`` instead, and every route says other errors have that shape too."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for name, model in (("ErrorResponse", ErrorResponse), ("ErrorDetail", ErrorDetail)):
            schemas[name] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas["ErrorResponse"].pop("$defs", None)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "Invalid request: the message names the field", **error}
                responses["default"] = {"description": "Any other error, in the same shape", **error}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """(param, message) of one pydantic error, in words a client can act on."""
    loc = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    kind, message = error.get("type", ""), str(error.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return loc, f"{loc}: unknown field; leave it out (this server does not support it)"
    if kind == "json_invalid":
        return "body", f"the body is not valid JSON ({error.get('ctx', {}).get('error', message)})"
    if kind == "missing":
        return loc, f"{loc}: required"
    return loc, f"{loc}: {message.removeprefix('Value error, ')}" if loc else message.removeprefix("Value error, ")
