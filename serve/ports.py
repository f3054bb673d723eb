"""Fail fast on a port that is taken, before minutes of base loading and without a traceback.

gRPC binds with SO_REUSEPORT by default, so a second server on a port in use would start and take
half of the first one's connections; the server turns that off (``grpc.so_reuseport`` 0) and checks
every port it will listen on first, with a plain socket bound the way a server binds.
"""

from __future__ import annotations

import errno
import socket

from adapterhub.errors import ConfigError


def check_free(host: str, port: int, flag: str) -> None:
    """Raise ConfigError naming ``flag`` when ``host:port`` cannot be bound (port 0: any free one)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {port}: cannot resolve host {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as exc:
                raise in_use(host, port, flag, exc) from None


def listen(host: str, port: int, flag: str) -> socket.socket:
    """A listening socket on ``host:port`` (SO_REUSEADDR, never SO_REUSEPORT), or the one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {port}: cannot resolve host {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise in_use(host, port, flag, exc) from None
    return sock


def in_use(host: str, port: int, flag: str, exc: Exception) -> ConfigError:
    """The one-line error for a failed bind of ``host:port`` (``exc``: the OSError, or gRPC's RuntimeError)."""
    code = getattr(exc, "errno", None)
    if code == errno.EACCES:
        return ConfigError(f"{flag} {port}: not allowed to bind {host}:{port} (ports below 1024 need privileges)")
    if code not in (None, errno.EADDRINUSE):
        return ConfigError(f"{flag} {port}: cannot bind {host}:{port} ({exc.strerror}); check --host")
    return ConfigError(f"{flag} {port}: {host}:{port} is already in use (another server running?); "
                       f"stop it or choose another port")
