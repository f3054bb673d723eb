"""Serving-only errors; the interceptor maps these (and adapterhub.errors) to gRPC status codes."""

from __future__ import annotations

from adapterhub.errors import AdapterHubError


class RequestTimeout(AdapterHubError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class RequestCancelled(AdapterHubError):
    """The client went away; the request's batch slot was freed (CANCELLED)."""


class ShuttingDown(AdapterHubError):
    """The server is stopping and takes no new requests (UNAVAILABLE)."""
