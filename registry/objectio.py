"""The object-store primitives the registry needs, over ``obstore``, with errors made ours.

Every call goes through :class:`Bucket`, so two things live in one place: obstore's exceptions become
``AdapterHubError``s that name the registry URL and never a secret (:meth:`RegistryLocation.redact`),
and compare-and-swap works on every backend. S3, GCS, Azure and obstore's MemoryStore do it
themselves (``put(mode={"e_tag": ...})`` sends ``If-Match``); obstore's LocalStore (``file://``)
raises NotImplementedError for that mode (obstore 0.12.1), so for it alone :meth:`Bucket.put_if`
holds a ``filelock`` on ``<root>/.cas.lock`` around read-compare-write. That is sound because
the files are on a local filesystem, where every writer of the registry can take the same lock.
Create-only writes (``mode="create"``, ``If-None-Match: *``) are native everywhere, LocalStore
included (it links a staged file into place, which fails if the name exists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

from adapterhub.errors import AdapterHubError, ConfigError, NotFound

from .location import RegistryLocation

_MEMORY_STORES: dict[str, Any] = {}
_MEMORY_LOCK = threading.Lock()


class RegistryUnavailable(AdapterHubError):
    """The object store refused or could not be reached (credentials, network, permissions)."""


class LostRace(Exception):
    """A conditional write found the object changed (or present) since it was read."""


@dataclasses.dataclass(frozen=True)
class Version:
    """What a conditional write compares: the object's ETag (and version, where the store has one)."""

    e_tag: str | None
    version: str | None = None

    def mode(self) -> dict[str, str]:
        return {k: v for k, v in (("e_tag", self.e_tag), ("version", self.version)) if v is not None}


class Got(NamedTuple):
    """An object read whole: its bytes, its version (for a later compare-and-swap), when it was written."""

    data: bytes
    version: Version
    modified: _dt.datetime


@dataclasses.dataclass(frozen=True)
class Entry:
    """One listed object: its path (relative to the registry), size and last-modified time (store clock)."""

    path: str
    size: int
    modified: _dt.datetime

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class Bucket:
    """A registry URL opened with obstore; paths are relative to the URL's prefix."""

    def __init__(self, location: RegistryLocation):
        self.location = location
        self.url = location.display
        self._store: Any = None
        self._local_root = location.local_root()

    # -- opening ---------------------------------------------------------------------------

    def _open(self, *, write: bool) -> Any:
        if self._store is not None:
            return self._store
        import obstore.store  # lazy: the CLI parser and directory registries never need it

        if self.location.scheme == "memory":
            name = self.location.target.split("://", 1)[1].strip("/")
            with _MEMORY_LOCK:
                self._store = _MEMORY_STORES.setdefault(name, obstore.store.MemoryStore()) if name else \
                    obstore.store.MemoryStore()
            return self._store
        if self._local_root is not None and not self._local_root.is_dir():
            if not write:
                raise NotFound(f"registry {self.url} does not exist (no directory {self._local_root})")
            self._local_root.mkdir(parents=True, exist_ok=True)
        config, client = self.location.store_options()
        try:
            self._store = obstore.store.from_url(self.location.target, config=config or None,
                                                 client_options=client or None)
        except Exception as exc:  # UnknownConfigurationKeyError, GenericError for a bad URL, ValueError
            raise ConfigError(f"cannot open registry {self.url}: {self._describe(exc)}") from None
        return self._store

    def _describe(self, exc: BaseException) -> str:
        """The first paragraph of obstore's message (its "Debug source" dump may hold a parsed URL), redacted."""
        text = str(exc).split("\n\nDebug source", 1)[0].strip()
        return self.location.redact(f"{type(exc).__name__}: {text}")

    @contextlib.contextmanager
    def _errors(self, path: str, doing: str) -> Iterator[None]:
        from obstore import exceptions as e

        try:
            yield
        except (e.NotFoundError, FileNotFoundError):
            raise
        except (e.AlreadyExistsError, e.PreconditionError):
            raise
        except (e.PermissionDeniedError, e.UnauthenticatedError, PermissionError) as exc:
            raise RegistryUnavailable(f"registry {self.url}: permission denied {doing} {path} ({self._describe(exc)}); "
                                      "check the credentials obstore reads from the environment, or "
                                      "--registry-option") from None
        except (e.BaseError, OSError) as exc:
            raise RegistryUnavailable(f"registry {self.url}: {doing} {path} failed ({self._describe(exc)})") from None

    # -- reading ---------------------------------------------------------------------------

    def get(self, path: str) -> Got | None:
        """The object's bytes, version and time, or None when it does not exist."""
        import obstore

        try:
            store = self._open(write=False)
            with self._errors(path, "reading"):
                result = obstore.get(store, path)
                data = bytes(result.bytes())
        except (FileNotFoundError, _not_found(), NotFound):
            return None
        meta = result.meta
        return Got(data, Version(meta.get("e_tag"), meta.get("version")), meta["last_modified"])

    def head(self, path: str) -> Entry | None:
        import obstore

        try:
            store = self._open(write=False)
            with self._errors(path, "reading"):
                meta = obstore.head(store, path)
        except (FileNotFoundError, _not_found(), NotFound):
            return None
        return Entry(meta["path"], meta["size"], meta["last_modified"])

    def copy_to(self, path: str, out: BinaryIO) -> None:
        """Stream the object into ``out``; FileNotFoundError when it does not exist."""
        import obstore

        try:
            store = self._open(write=False)
            with self._errors(path, "reading"):
                for chunk in obstore.get(store, path):
                    out.write(chunk)
        except (_not_found(), NotFound):
            raise FileNotFoundError(path) from None

    def list(self, prefix: str) -> list[Entry]:
        """Every object under ``prefix`` (a folder, ending in ``/``)."""
        import obstore

        try:
            store = self._open(write=False)
        except NotFound:
            return []
        with self._errors(prefix, "listing"):
            return [Entry(m["path"], m["size"], m["last_modified"])
                    for chunk in obstore.list(store, prefix) for m in chunk]

    def folders(self, prefix: str) -> list[str]:
        """The names of the folders directly under ``prefix``."""
        import obstore

        try:
            store = self._open(write=False)
        except NotFound:
            return []
        with self._errors(prefix, "listing"):
            found = obstore.list_with_delimiter(store, prefix.rstrip("/"))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"])

    # -- writing ---------------------------------------------------------------------------

    def put(self, path: str, data: bytes | Path) -> None:
        """Write (or replace) the object atomically."""
        import obstore

        store = self._open(write=True)
        with self._errors(path, "writing"):
            obstore.put(store, path, data)

    def create(self, path: str, data: bytes) -> bool:
        """Write the object only if it does not exist (``If-None-Match: *``); False when it did."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        store = self._open(write=True)
        try:
            with self._errors(path, "writing"):
                obstore.put(store, path, data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def put_if(self, path: str, data: bytes, expected: Version | None) -> None:
        """Compare-and-swap: write only if the object is still at ``expected`` (None: still absent).

        Raises :class:`LostRace` when another writer got there first.
        """
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        store = self._open(write=True)
        if self._local_root is not None:
            self._local_put_if(store, path, data, expected)
            return
        try:
            with self._errors(path, "writing"):
                obstore.put(store, path, data, mode="create" if expected is None else expected.mode())
        except (AlreadyExistsError, PreconditionError, _not_found()):
            raise LostRace(path) from None

    def _local_put_if(self, store: Any, path: str, data: bytes, expected: Version | None) -> None:
        """LocalStore's compare-and-swap: read, compare and replace under one file lock."""
        import filelock
        import obstore

        with filelock.FileLock(str(self._local_root / ".cas.lock"), timeout=60):
            try:
                with self._errors(path, "reading"):
                    current: str | None = obstore.head(store, path).get("e_tag")
            except (FileNotFoundError, _not_found()):
                current = None
                if expected is not None:
                    raise LostRace(path) from None
            if current is not None and (expected is None or current != expected.e_tag):
                raise LostRace(path)
            with self._errors(path, "writing"):
                obstore.put(store, path, data)

    def delete(self, path: str) -> None:
        """Delete the object (absent is fine)."""
        import obstore

        store = self._open(write=True)
        try:
            with self._errors(path, "deleting"):
                obstore.delete(store, path)
        except (FileNotFoundError, _not_found()):
            pass


def _not_found() -> type[BaseException]:
    from obstore.exceptions import NotFoundError

    return NotFoundError
