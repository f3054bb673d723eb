"""Bearer tokens, checked the same way by both doors (gRPC metadata, HTTP ``Authorization``)."""

from __future__ import annotations

import hmac

from .errors import PermissionDenied, Unauthenticated


class Tokens:
    """The inference token and the admin token (the inference one when no separate admin token is set).

    A service whose token is None is open. A separate admin token is not granted by the inference one.
    """

    def __init__(self, token: str | None, admin_token: str | None = None):
        self._token = token.encode() if token else None
        self._admin = admin_token.encode() if admin_token else self._token

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._admin is not None

    def check(self, authorization: str | None, *, admin: bool, where: str) -> None:
        """Raise Unauthenticated / PermissionDenied unless ``authorization`` is ``Bearer <the right token>``.

        ``where`` says how the token is sent (the error names it, so a client knows what to fix).
        """
        expected = self._admin if admin else self._token
        if expected is None:
            return
        scheme, _, value = (authorization or "").strip().partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else None
        if given is not None and hmac.compare_digest(given, expected):
            return
        separate_admin = admin and self._admin != self._token
        if separate_admin and given is not None and self._token is not None and hmac.compare_digest(given, self._token):
            raise PermissionDenied("this needs the admin token; the inference token does not grant admin calls")
        which = "admin token" if separate_admin else "bearer token"
        raise Unauthenticated(f"missing or wrong {which} ({where} 'Authorization: Bearer ...')")
