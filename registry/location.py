"""Where a registry lives: a directory path or an object-store URL, its options, and its read cache.

``--registry`` (and ``$ADAPTERHUB_HOME``) take either a plain path, which stays the embedded
:class:`FileStore`, or a URL, which opens an :class:`ObjectStore` over ``obstore``:
``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix`` (also ``azure``, ``abfs``,
``abfss``, ``adl``), ``file:///absolute/path`` and ``memory://`` / ``memory://NAME`` (one store per
name and process, for tests). Credentials come from wherever obstore reads them (``AWS_*``,
``GOOGLE_*``, ``AZURE_*`` environment variables and the clouds' usual files); ``--registry-option
KEY=VALUE`` passes anything else (``endpoint``, ``region``, ``virtual_hosted_style_request``,
``allow_http``, ``timeout``...).

A :class:`RegistryLocation` carries all of it through code that used to pass a directory string, so
a trainer or a server can hand it on without knowing what is inside. Secrets never reach a message:
:meth:`RegistryLocation.redact` removes userinfo, query strings and the values of secret-looking
options from any text, and ``str()``/``repr()`` show only the redacted URL.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from adapterhub.errors import ConfigError

HOME_ENV = "ADAPTERHUB_HOME"

OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "file", "memory"})
# obstore's ClientConfig keys (HTTP client settings); every other option is the store's own config
CLIENT_OPTIONS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type", "http1_only",
    "http2_keep_alive_interval", "http2_keep_alive_timeout", "http2_keep_alive_while_idle", "http2_only",
    "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url", "proxy_ca_certificate", "proxy_excludes",
    "randomize_addresses", "read_timeout", "timeout", "user_agent",
})
_SECRET_KEY = re.compile(r"secret|token|password|passwd|key|sas|sig|credential", re.IGNORECASE)
# environment variables whose values must never be echoed, whatever an error message contains
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_KEY",
               "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_SECRET", "GOOGLE_SERVICE_ACCOUNT_KEY")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[^\s?\"'<>]*)\?[^\s\"'<>]*")


def is_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` names an object store (``scheme://...``) rather than a directory."""
    return isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


@dataclasses.dataclass(frozen=True)
class RegistryLocation:
    """A registry path or URL with the options to open it and the read cache to use.

    ``options`` go to obstore (URLs only); ``cache_dir``/``cache_max_bytes`` configure the local
    read cache (:mod:`.readcache`; ``None``: ``$ADAPTERHUB_CACHE`` or the user's cache dir, 10 GiB).
    """

    target: str
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    cache_max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.options and not self.is_url:
            raise ConfigError(f"--registry-option applies to registry URLs (s3://, gs://, az://, file://), not to "
                              f"the directory {self.target}; drop the option or give a URL")
        if self.is_url:
            scheme = self.scheme
            if scheme not in OBJECT_SCHEMES:
                raise ConfigError(f"registry URL scheme {scheme!r} is not supported ({self.display}); use one of "
                                  + ", ".join(f"{s}://" for s in sorted(OBJECT_SCHEMES)) + " or a directory path")

    @property
    def is_url(self) -> bool:
        return is_url(self.target)

    @property
    def scheme(self) -> str:
        return self.target.split("://", 1)[0].lower()

    @property
    def display(self) -> str:
        """The URL without userinfo, query or fragment: what messages show."""
        if not self.is_url:
            return self.target
        parts = urllib.parse.urlsplit(self.target)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def secrets(self) -> list[str]:
        """Every string that must not appear in a message (longest first, so none hides inside another)."""
        found = [str(v) for k, v in self.options.items() if _SECRET_KEY.search(k)]
        if self.is_url:
            parts = urllib.parse.urlsplit(self.target)
            found += [p for p in (parts.username, parts.password) if p]
            found += [v for _, v in urllib.parse.parse_qsl(parts.query)]
        found += [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with this location's secrets, any URL userinfo and any URL query removed."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
            text = text.replace(urllib.parse.quote(secret, safe=""), "***")
        text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
        return _URL_QUERY.sub(lambda m: m.group("url") + "?***", text)

    def local_root(self) -> Path | None:
        """The directory of a ``file://`` URL (None for other schemes)."""
        if not self.is_url or self.scheme != "file":
            return None
        parts = urllib.parse.urlsplit(self.target)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{self.display}: a file:// URL names a local directory: file:///absolute/path")
        return Path(urllib.parse.unquote(parts.path))

    def store_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(store config, HTTP client options) for ``obstore.store.from_url``."""
        config: dict[str, Any] = {}
        client: dict[str, Any] = {}
        for key, value in self.options.items():
            (client if key.lower() in CLIENT_OPTIONS else config)[key.lower()] = value
        return config, client

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}=***" if _SECRET_KEY.search(k) else f"{k}={self.redact(str(v))}"
                         for k, v in sorted(self.options.items()))
        return f"RegistryLocation({self.display!r}{', ' + keys if keys else ''})"

    def __fspath__(self) -> str:
        """Only for a directory registry: code written for paths keeps working with one."""
        if self.is_url:
            raise TypeError(f"registry {self.display} is a URL, not a local path")
        return self.target


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["endpoint=http://...", "region=us-east-1"]`` -> dict; a malformed pair names itself (not its value)."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            shown = key if _SECRET_KEY.search(key) or not sep else pair
            raise ConfigError(f"--registry-option {shown!r}: expected KEY=VALUE, e.g. endpoint=http://127.0.0.1:9000")
        options[key] = value
    return options


def parse_size(text: str | int | None) -> int | None:
    """``"10G"``, ``"500M"``, ``"1048576"`` -> bytes (powers of 1024); None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"--cache-max-bytes {text!r}: expected a number of bytes, e.g. 10G, 500M or 1048576")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def resolve_location(
    registry: str | os.PathLike | RegistryLocation | None = None,
    *,
    options: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_max_bytes: int | str | None = None,
) -> RegistryLocation:
    """``registry``, else ``$ADAPTERHUB_HOME``, else ``~/.adapterhub``, with the given settings added."""
    if isinstance(registry, RegistryLocation):
        base = registry
    else:
        target = registry or os.environ.get(HOME_ENV) or str(Path.home() / ".adapterhub")
        target = os.fspath(target)
        if not is_url(target):
            target = str(Path(target).expanduser())
        base = RegistryLocation(target)
    return dataclasses.replace(
        base,
        options={**base.options, **(options or {})},
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else base.cache_dir,
        cache_max_bytes=parse_size(cache_max_bytes) if cache_max_bytes is not None else base.cache_max_bytes,
    )


# -- command-line arguments ---------------------------------------------------------------------


def add_registry_arguments(parser: Any, *, suppress: bool = False) -> None:
    """``--registry``, ``--registry-option``, ``--cache-dir``, ``--cache-max-bytes`` on a command.

    ``suppress``: leave an option unset when not given (argparse.SUPPRESS), so a value given before a
    subcommand is not clobbered by the subcommand's default.
    """
    import argparse

    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--registry", metavar="DIR|URL", default=default,
                        help="registry directory, or s3:// gs:// az:// file:// URL (default: $ADAPTERHUB_HOME or "
                             "~/.adapterhub)")
    parser.add_argument("--registry-option", metavar="KEY=VALUE", action="append", default=default,
                        help="object-store option for a registry URL, repeatable (e.g. endpoint=http://host:9000, "
                             "region=eu-west-1, virtual_hosted_style_request=false, allow_http=true)")
    parser.add_argument("--cache-dir", default=default,
                        help="where verified copies of registry versions are kept (default: $ADAPTERHUB_CACHE or "
                             "~/.cache/adapterhub)")
    parser.add_argument("--cache-max-bytes", default=default,
                        help="size bound of --cache-dir, least recently used evicted first (default 10G)")


def location_from_args(args: Any, registry: Any = None) -> RegistryLocation:
    """The location the registry arguments of ``args`` name (``registry`` overrides ``args.registry``,
    e.g. a value a config file gave)."""
    return resolve_location(
        registry if registry is not None else getattr(args, "registry", None),
        options=parse_options(getattr(args, "registry_option", None)),
        cache_dir=getattr(args, "cache_dir", None),
        cache_max_bytes=getattr(args, "cache_max_bytes", None),
    )
