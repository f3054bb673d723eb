"""The ONE place a domain error becomes a status: a gRPC code, an HTTP status and OpenAI's error type.

Both doors (the gRPC interceptor and the OpenAI HTTP API) ask :func:`status_for`, so an error
class means the same thing to every client.
"""

from __future__ import annotations

import dataclasses

import grpc

from adapterhub import errors

from .errors import PermissionDenied, RequestCancelled, RequestTimeout, ShuttingDown, Unauthenticated


@dataclasses.dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int
    kind: str  # OpenAI's error "type"

    @property
    def name(self) -> str:  # the label requests are counted under, whichever door they came through
        return self.grpc.name


INVALID = Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")
OK = Status(grpc.StatusCode.OK, 200, "")

# Checked in order; the first matching class wins.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], Status], ...] = (
    (Unauthenticated, Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")),
    (PermissionDenied, Status(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error")),
    (errors.NotFound, Status(grpc.StatusCode.NOT_FOUND, 404, "not_found_error")),
    (errors.InvalidReference, INVALID),
    (errors.LimitExceeded, INVALID),
    (errors.ConfigError, INVALID),
    (errors.DataError, INVALID),
    (errors.BaseMismatch, Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error")),
    (errors.Overloaded, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")),
    (RequestTimeout, Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error")),
    (RequestCancelled, Status(grpc.StatusCode.CANCELLED, 499, "cancelled")),
    (ShuttingDown, Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error")),
    (errors.AdapterHubError, Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error")),
)


def status_for(exc: BaseException) -> Status:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return INTERNAL


def public_message(exc: BaseException, status: Status) -> str:
    """What a client is told: the domain error's own words, never an internal traceback."""
    if status is INTERNAL:
        return f"internal error ({type(exc).__name__}); see the server log"
    return str(exc)
