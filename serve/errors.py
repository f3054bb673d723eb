"""Serving-only errors; :mod:`status` maps these (and adapterhub.errors) to gRPC and HTTP statuses."""

from __future__ import annotations

from adapterhub.errors import AdapterHubError


class RequestTimeout(AdapterHubError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED, 504)."""


class RequestCancelled(AdapterHubError):
    """The client went away; the request's batch slot was freed (CANCELLED)."""


class ShuttingDown(AdapterHubError):
    """The server is stopping and takes no new requests (UNAVAILABLE, 503, with a retry hint)."""


class RowFailed(AdapterHubError):
    """Something went wrong for this request's row alone (sampling, stop strings, detokenization, its
    adapters' hooks or numerics); the other rows of its batch went on (INTERNAL, 500, its own words)."""


class StepFailed(AdapterHubError):
    """The shared forward pass of the step this request was in failed; the engine logged it once and
    serves the next step (INTERNAL, 500, its own words)."""


class Unauthenticated(AdapterHubError):
    """No bearer token, or a wrong one (UNAUTHENTICATED, 401)."""


class PermissionDenied(AdapterHubError):
    """A valid inference token used where the admin token is needed (PERMISSION_DENIED, 403)."""
