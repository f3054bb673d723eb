"""Verified local copies of registry versions, so that readers never write to the registry.

``materialize`` and ``read_version`` of every store copy a version's blobs into a cache directory of
the reader's own (``--cache-dir``, else ``$ADAPTERHUB_CACHE``, else ``$XDG_CACHE_HOME/adapterhub`` or
``~/.cache/adapterhub``), hashing the bytes as they arrive, and serve loads from there. A read-only
registry directory or a bucket with read-only credentials therefore serves every version, and a
server on another machine than the registry pays the download once.

Layout::

    <cache>/.lock                     filelock: touching an entry, eviction
    <cache>/versions/<digest>/<file>  a version's files + adapterhub.json + manifest.json, read-only

An entry is keyed by the sha256 of its manifest (the ``manifest.json`` it holds), not by
``task@N``: the same task@N in two registries, or a removed and re-published version elsewhere,
can never collide, and one cache serves any number of registries. Entries are whole versions rather
than single blobs because loaders want a directory that holds exactly one version; the blobs that
versions share are small config files (weights differ per version), so little is duplicated.

Several processes on one host share a cache safely: an entry is built in a private ``.incomplete``
directory and renamed into place (a concurrent builder loses harmlessly), eviction renames an entry
away before deleting it, and both eviction and "touch" (which marks an entry used, by its mtime)
run under the cache lock, so an entry touched in the last ``min_age`` seconds (60 by default) is
never evicted: a reader has at least that long to open its files. The cache is bounded by
``max_bytes`` (10 GiB by default), least recently used first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO, Protocol

import filelock

from adapterhub.errors import AdapterHubError, ConfigError, IntegrityError

from . import fsutil, hashing
from .manifest import Manifest
from .names import validate_file_name
from .store import VersionRead

log = logging.getLogger(__name__)

CACHE_ENV = "ADAPTERHUB_CACHE"
DEFAULT_MAX_BYTES = 10 * 2**30
MIN_AGE = 60.0


class BlobSource(Protocol):
    """What a store gives the cache: a blob's bytes, and where it lives (for messages)."""

    def copy_blob(self, sha256: str, out: BinaryIO) -> None:
        """Write the blob's bytes to ``out``; FileNotFoundError when it does not exist."""

    def blob_location(self, sha256: str) -> str:
        """The blob's path or URL, for error messages."""


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapterhub"


class ReadCache:
    """A size-bounded LRU directory of verified version snapshots, shared by processes on one host."""

    def __init__(self, root: str | os.PathLike | None = None, *, max_bytes: int | None = None,
                 min_age: float = MIN_AGE) -> None:
        self.root = Path(root).expanduser().absolute() if root is not None else default_cache_dir().absolute()
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ConfigError(f"--cache-max-bytes {max_bytes} must be >= 0")
        self.min_age = min_age
        self._over_bound = False  # the last eviction pass could not get under the bound: retry on hits

    def __repr__(self) -> str:
        return f"ReadCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def entry_path(self, manifest: Manifest) -> Path:
        return self.root / "versions" / hashlib.sha256(manifest.to_json().encode()).hexdigest()

    # -- the two ways in -------------------------------------------------------------------

    def materialize(self, manifest: Manifest, source: BlobSource, *, verify: str = "hash") -> Path:
        """The entry of ``manifest``, built if missing; checked each call (``verify``: "hash" re-hashes
        every file, "size" checks names and sizes). A damaged entry is rebuilt once from the registry."""
        if verify not in ("hash", "size"):
            raise ValueError(f"verify must be 'hash' or 'size', got {verify!r}")
        path = self.ensure(manifest, source)
        try:
            check_snapshot(manifest, path, verify)
        except IntegrityError as exc:
            log.warning("cached copy of %s is damaged (%s); fetching it again", manifest.ref, exc)
            self._discard(path)
            path = self.ensure(manifest, source)
            check_snapshot(manifest, path, verify)
        return path

    def read_version(self, manifest: Manifest, source: BlobSource, *, hasher: Executor | None = None) -> VersionRead:
        """Each file of the entry read once; ``check`` compares the sha256 of those same bytes.

        With ``hasher`` (a single-thread executor) the hashing runs there while the read goes on
        and while the caller works on the bytes (see :mod:`.hashing`). A mismatch discards the
        entry, so the next load fetches the version again.
        """
        path = self.ensure(manifest, source)
        data, checks = {}, {}
        # biggest first: its hash, the longest part of a load, starts before the small files' reads
        for name, entry in sorted(manifest.files.items(), key=lambda item: -item[1].size):
            buffer = bytearray(entry.size)
            checks[name] = check = hashing.verify_while_reading(hasher, entry, buffer)
            try:
                data[name] = fsutil.read_exactly(path / validate_file_name(name), entry.size, check.advanced,
                                                 into=buffer)
            except FileNotFoundError:
                data[name] = None
            check.finish()
            if data[name] is None:  # missing, or another size than the manifest's
                for started in checks.values():
                    started.matches()  # let the hasher finish with the buffers first
                self._discard(path)
                raise _damaged(manifest, name, path)

        def check() -> None:
            for name in manifest.files:
                if not checks[name].matches():
                    self._discard(path)
                    raise _damaged(manifest, name, path)

        def check_directory() -> None:
            self.ensure(manifest, source)  # evicted since (a slow path reads it later): fetch again
            check_snapshot(manifest, path, "size")

        return VersionRead(manifest, path, data, check, check_directory=check_directory)

    # -- entries ---------------------------------------------------------------------------

    def ensure(self, manifest: Manifest, source: BlobSource) -> Path:
        """The entry's path, present and marked used (built from ``source`` when missing)."""
        path = self.entry_path(manifest)
        with self._locked():
            if _touch(path):
                if self._over_bound:
                    self._evict_locked(keep=path)
                return path
        self._build(manifest, source, path)
        with self._locked():
            _touch(path)
            self._evict_locked(keep=path)
        return path

    def _build(self, manifest: Manifest, source: BlobSource, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            building = fsutil.temp_path(path)
            building.mkdir()
        except OSError as exc:
            raise ConfigError(f"cannot write the registry read cache {self.root} ({exc.strerror}); point "
                              f"--cache-dir (or ${CACHE_ENV}) at a writable directory") from None
        try:
            for name, entry in manifest.files.items():
                target = building / validate_file_name(name)
                with open(target, "xb") as f:
                    out = _HashingWriter(f, entry.size)
                    try:
                        source.copy_blob(entry.sha256, out)
                    except FileNotFoundError:
                        raise IntegrityError(
                            f"{manifest.ref}: file {name!r} points at missing blob {source.blob_location(entry.sha256)}; "
                            "the registry is damaged (run `adapterhub registry verify`), re-publish the adapter"
                        ) from None
                if out.size != entry.size or out.digest.hexdigest() != entry.sha256:
                    raise _corrupt(manifest, name, source.blob_location(entry.sha256))
                os.chmod(target, 0o444)
            for name, data in manifest.described_files().items():
                (building / name).write_bytes(data)
                os.chmod(building / name, 0o444)
            try:
                os.rename(building, path)  # atomic; a concurrent builder of the same entry wins harmlessly
            except OSError:
                if not path.is_dir():
                    raise
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)

    def _discard(self, path: Path) -> None:
        with self._locked():
            fsutil.remove_tree(path)

    @contextlib.contextmanager
    def _locked(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(self.root / ".lock"), timeout=120)
            with lock:
                yield
        except filelock.Timeout:
            raise AdapterHubError(f"the read cache {self.root} is locked by another process for more than 120 s; "
                                  "check for a hung adapterhub process") from None
        except PermissionError as exc:
            raise ConfigError(f"cannot write the registry read cache {self.root} ({exc.strerror}); point "
                              f"--cache-dir (or ${CACHE_ENV}) at a writable directory") from None

    def usage(self) -> dict[str, int]:
        """Entries and bytes held now."""
        entries = self._entries()
        return {"entries": len(entries), "bytes": sum(size for _, size, _ in entries)}

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every complete entry; removes dead builders' temp dirs."""
        folder = self.root / "versions"
        found = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if fsutil.is_temp(path):
                if fsutil.is_stale_temp(path, stale_after=24 * 3600):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                used = path.stat().st_mtime
                size = sum(f.stat().st_size for f in path.iterdir())
            except FileNotFoundError:  # removed meanwhile by a process that does not lock (a user)
                continue
            found.append((used, size, path))
        return found

    def _evict_locked(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        was_over, self._over_bound = self._over_bound, False
        if total <= self.max_bytes:
            return
        now = time.time()
        for used, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep or now - used < self.min_age:
                continue
            fsutil.remove_tree(path)
            total -= size
            log.info("read cache: evicted %s (%d bytes)", path.name, size)
        self._over_bound = total > self.max_bytes
        if self._over_bound and not was_over:
            log.warning("read cache %s holds %d bytes, over its bound of %d: every entry was used in the last "
                        "%g s; raise --cache-max-bytes", self.root, total, self.max_bytes, self.min_age)


def check_snapshot(manifest: Manifest, directory: Path, verify: str) -> None:
    """The directory holds exactly the version's files (and its two described files), unchanged."""
    described = manifest.described_files()
    present = set(os.listdir(directory))
    expected = set(manifest.files) | set(described)
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise IntegrityError(
            f"snapshot {directory} of {manifest.ref} does not match its manifest "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}); remove the directory to rebuild it"
        )
    for name, data in described.items():
        if (directory / name).read_bytes() != data:
            raise IntegrityError(f"{directory / name} of {manifest.ref} was changed; remove {directory} to rebuild it")
    for name, entry in manifest.files.items():
        path = directory / name
        if path.stat().st_size != entry.size or (verify == "hash" and fsutil.sha256_file(path) != entry.sha256):
            raise _corrupt(manifest, name, str(path))


def _corrupt(manifest: Manifest, name: str, where: str) -> IntegrityError:
    return IntegrityError(
        f"{manifest.ref}: file {name!r} ({where}) no longer matches its recorded sha256 "
        f"{manifest.files[name].sha256[:12]}...; refusing to load it. Run `adapterhub registry verify` "
        "and re-publish the adapter"
    )


def _damaged(manifest: Manifest, name: str, path: Path) -> IntegrityError:
    return IntegrityError(
        f"{manifest.ref}: file {name!r} ({path / name}) no longer matches its recorded sha256 "
        f"{manifest.files[name].sha256[:12]}... (a damaged copy in the read cache: removed, the next load "
        "fetches it again; if that fails too, run `adapterhub registry verify`)"
    )


def _touch(path: Path) -> bool:
    """Mark an entry used now; False when there is none."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return path.is_dir()


class _HashingWriter:
    """A file's sha256 taken as its bytes are written; stops a blob that runs past its expected size."""

    def __init__(self, f: BinaryIO, expected_size: int) -> None:
        self._f = f
        self._limit = expected_size
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        if self.size > self._limit:
            return len(data)  # counted, not kept: the size check after the copy names the file
        self.digest.update(data)
        self._f.write(data)
        return len(data)
