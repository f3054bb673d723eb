"""Server interceptors: errors become status codes (through :mod:`status`, shared with the HTTP
door), the per-request log line and request metrics (:mod:`request_log`), and optional bearer-token auth."""

from __future__ import annotations

from typing import Any, Callable

import grpc

from .auth import Tokens
from .errors import PermissionDenied, Unauthenticated
from .request_log import Watch
from .status import public_message, status_for


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes, logs one line per RPC and records request metrics."""

    def __init__(self, metrics: Any = None):
        self.metrics = metrics

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        name = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(name, handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return handler

    def _unary(self, name: str, behavior: Callable) -> Callable:
        def wrapper(request, context):
            watch = Watch(name, self.metrics)
            try:
                response = behavior(request, context)
            except Exception as exc:
                self._abort(watch, exc, context)
            watch.done(response)
            return response

        return wrapper

    def _stream(self, name: str, behavior: Callable) -> Callable:
        def wrapper(request, context):
            watch, last = Watch(name, self.metrics), None
            try:
                for last in behavior(request, context):
                    yield last
            except Exception as exc:
                self._abort(watch, exc, context)
            watch.done(last)

        return wrapper

    @staticmethod
    def _abort(watch: Watch, exc: Exception, context: grpc.ServicerContext) -> None:
        status = watch.fail(exc)
        context.abort(status.grpc, shorten(public_message(exc, status)))


MAX_DETAILS_BYTES = 3000


def _wire_cost(ch: str) -> int:
    """Bytes a character takes in grpc-message (percent-encoded unless printable ASCII)."""
    return 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "surrogatepass"))


def shorten(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """Keep status details well under gRPC's 8 KiB metadata soft limit (clients drop larger ones
    as RESOURCE_EXHAUSTED), even when an error echoes a huge or non-ASCII value from the request."""
    cost, end = 0, 0
    for end, ch in enumerate(message):
        cost += _wire_cost(ch)
        if cost > limit - 40:
            return message[:end] + f"... [{len(message) - end} more characters]"
    return message


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks (see :class:`Tokens`).

    Reflection needs the inference token: it describes the API.
    """

    ADMIN_PREFIX = "/adapterhub.v1.Admin/"

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health"):
            return continuation(details)
        try:
            self.tokens.check(dict(details.invocation_metadata or ()).get("authorization"),
                              admin=details.method.startswith(self.ADMIN_PREFIX), where="send metadata")
            return continuation(details)
        except (Unauthenticated, PermissionDenied) as exc:
            denial = exc
        handler = continuation(details)
        code, message = status_for(denial).grpc, str(denial)

        def deny(request, context):
            context.abort(code, message)

        if handler is not None and handler.request_streaming and handler.response_streaming:
            def deny_bidi(request_iterator, context):
                deny(None, context)
                yield  # pragma: no cover
            return grpc.stream_stream_rpc_method_handler(deny_bidi, handler.request_deserializer, handler.response_serializer)
        if handler is not None and handler.unary_stream is not None:
            def deny_stream(request, context):
                deny(request, context)
                yield  # pragma: no cover
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer if handler else None, handler.response_serializer if handler else None)
