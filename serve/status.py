"""The ONE place a domain error becomes a status: a gRPC code, an HTTP status and OpenAI's error type.

Both doors (the gRPC interceptor and the OpenAI HTTP API) ask :func:`status_for`, so an error
class means the same thing to every client.
"""

from __future__ import annotations

import dataclasses
import re

import grpc

from adapterhub import errors

from .errors import (PermissionDenied, RequestCancelled, RequestTimeout, RowFailed, ShuttingDown, StepFailed,
                     Unauthenticated)


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
# INTERNAL on the wire, but not the INTERNAL above: the engine wrote these messages for the client and
# logged the traceback once itself, so neither door hides the words nor logs a traceback per request
ENGINE_FAULT = Status(grpc.StatusCode.INTERNAL, 500, "server_error")

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
    (RowFailed, ENGINE_FAULT),
    (StepFailed, ENGINE_FAULT),
    (errors.AdapterHubError, Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error")),
)


def status_for(exc: BaseException) -> Status:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return INTERNAL


# an absolute path: a "/" that starts no URL and follows no word ("s3://b/k", "a/b" stay), then two
# folders or more (an API route such as /v1/models has one)
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"`,;()]+/){2,}")


def public_message(exc: BaseException, status: Status) -> str:
    """What a client is told: the domain error's own words, never an internal traceback, and never
    the server's directories (a registry error names ``.../blobs/<sha256>``: the client keeps the name)."""
    if status is INTERNAL:
        return f"internal error ({type(exc).__name__}); see the server log"
    return _ABSOLUTE_PATH.sub("…/", str(exc))
