"""The registry on an object store (S3, GCS, Azure, ``file://``, ``memory://``) through obstore.

The same semantics as :class:`FileStore`, with no lock server: every decision two writers could
race on is one conditional write that the store arbitrates.

Layout under the URL's prefix::

    blobs/<sha256>                     file bytes, named by their hash (idempotent puts)
    tasks/<task>/versions/<N>.json     the manifest of task@N; an EMPTY object marks a removed version
    tasks/<task>/refs/<tag>            "N\\n": the version a tag points at; empty: the tag was removed
    leases/<uuid>.json                 the blobs a publish in progress is about to reference (see .objectgc)
    gc.lock                            present while a gc runs

- A version exists iff ``versions/<N>.json`` exists and is not empty. Numbers are allocated by a
  create-only put of that manifest (``If-None-Match: *``): of two publishers that chose the same N
  exactly one succeeds; the other tries N+1.
- Numbers are never reused: ``rm`` does not delete the manifest, it replaces it with an empty
  object, so the name stays taken and the create-only put can never succeed on it again.
  (Deviation from a separate ``removed/<N>`` tombstone next to a deleted manifest: with two objects,
  an allocator that read "no tombstone" could still create N after another publisher created and
  removed N in between; with one name there is nothing to interleave.)
- Tags are one object each, moved by compare-and-swap on its ETag (``If-Match``; create-only when
  absent). A lost race re-reads and retries up to ``tag_retries`` times, then reports; nothing is
  ever overwritten blindly. ``untag`` writes an empty object by the same CAS.
- ``rm`` and ``set_tag`` may race on the same version: ``set_tag`` checks the version still exists
  after its write and puts the tag back if not; ``rm`` clears tags pointing at the version after
  emptying it. Either order leaves no tag on a removed version.
- Blobs are written before the manifest that names them, under a lease that ``gc`` respects
  (:mod:`.objectgc` says why no blob a publish is about to reference can be deleted).

Reads write nothing to the store: versions are verified into the local read cache
(:mod:`.readcache`).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO

from adapterhub.errors import AdapterHubError, IntegrityError, LimitExceeded, NotFound
from adapterhub.metadata import Metadata

from . import fsutil, hashing
from .filestore import DEFAULT_MAX_FILE_BYTES
from .location import RegistryLocation
from .manifest import FileEntry, Manifest
from .names import parse_reference, validate_tag, validate_task
from .objectgc import Lease, collect
from .objectio import Bucket, LostRace
from .readcache import ReadCache
from .store import AdapterStore, Problem, RefLike, VersionRead, file_entry, parse_manifest

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"([1-9][0-9]*)\.json")
_BLOB_RE = re.compile(r"[0-9a-f]{64}")


class ObjectStore(AdapterStore):
    """A registry at an object-store URL; safe for any number of writers on any number of hosts."""

    def __init__(
        self,
        location: RegistryLocation | str,
        *,
        cache: ReadCache | None = None,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
        lease_ttl: float = 3600.0,
        gc_wait: float = 900.0,
        tag_retries: int = 100,
    ) -> None:
        self.bucket = Bucket(location if isinstance(location, RegistryLocation) else RegistryLocation(location))
        self.cache = cache if cache is not None else ReadCache()
        self.max_file_bytes = max_file_bytes
        self.lease_ttl = lease_ttl
        self.gc_wait = gc_wait
        self.tag_retries = tag_retries
        self._manifests: dict[tuple[str, int], Manifest] = {}  # immutable once written

    def __repr__(self) -> str:
        return f"ObjectStore({self.bucket.url!r})"

    @property
    def location(self) -> str:
        return self.bucket.url

    # -- layout ----------------------------------------------------------------------------

    @staticmethod
    def _manifest_key(task: str, version: int) -> str:
        return f"tasks/{validate_task(task)}/versions/{int(version)}.json"

    @staticmethod
    def _tag_key(task: str, tag: str) -> str:
        return f"tasks/{validate_task(task)}/refs/{validate_tag(tag)}"

    @staticmethod
    def _blob_key(sha256: str) -> str:
        if not _BLOB_RE.fullmatch(sha256):
            raise IntegrityError(f"malformed blob hash {sha256!r}")
        return f"blobs/{sha256}"

    # -- reading ---------------------------------------------------------------------------

    def list_tasks(self) -> list[str]:
        tasks = []
        for name in self.bucket.folders("tasks/"):
            try:
                validate_task(name)
            except AdapterHubError:
                continue
            if self.list_versions(name):
                tasks.append(name)
        return tasks

    def _numbers(self, task: str) -> dict[int, int]:
        """Every allocated number of ``task`` -> its manifest's size (0: removed)."""
        found = {}
        for entry in self.bucket.list(f"tasks/{validate_task(task)}/versions/"):
            if m := _VERSION_RE.fullmatch(entry.name):
                found[int(m.group(1))] = entry.size
        return found

    def list_versions(self, task: str) -> list[int]:
        return sorted(n for n, size in self._numbers(task).items() if size > 0)

    def has_version(self, task: str, version: int) -> bool:
        entry = self.bucket.head(self._manifest_key(task, version))
        return entry is not None and entry.size > 0

    def tags(self, task: str) -> dict[str, int]:
        result = {}
        for entry in self.bucket.list(f"tasks/{validate_task(task)}/refs/"):
            if entry.size == 0 or entry.name.startswith("."):
                continue
            version = self._read_tag(task, entry.name)
            if version is not None:
                result[entry.name] = version
        return dict(sorted(result.items()))

    def _read_tag(self, task: str, tag: str) -> int | None:
        got = self.bucket.get(self._tag_key(task, tag))
        return None if got is None else self._tag_value(task, tag, got.data)

    def _tag_value(self, task: str, tag: str, data: bytes) -> int | None:
        text = data.decode("utf-8", errors="replace").strip()
        if not text:
            return None  # removed
        if not text.isdigit() or int(text) < 1:
            raise IntegrityError(f"tag {self.location}/{self._tag_key(task, tag)} holds {text[:40]!r}, "
                                 "not a version number")
        return int(text)

    def resolve(self, ref: RefLike) -> tuple[str, int]:
        """As the base class, with one request for a tag (its object) instead of listing every tag."""
        if isinstance(ref, Manifest):
            return ref.task, ref.version
        reference = parse_reference(ref)
        if reference.tag is not None and not reference.is_latest:
            version = self._read_tag(reference.task, reference.tag)
            if version is not None:
                return reference.task, version
        return super().resolve(reference)

    def manifest(self, ref: RefLike) -> Manifest:
        if isinstance(ref, Manifest):
            return ref
        task, version = self.resolve(ref)  # confirms the version exists (a tag: its object names it)
        cached = self._manifests.get((task, version))
        return cached if cached is not None else self.get_manifest(task, version)

    def get_manifest(self, task: str, version: int) -> Manifest:
        key = self._manifest_key(task, version)
        got = self.bucket.get(key)
        if got is None or not got.data:
            raise NotFound(f"{task}@{version} does not exist")
        manifest = parse_manifest(got.data, task, version, f"manifest {self.location}/{key}")
        self._manifests[task, version] = manifest
        return manifest

    def read_bytes(self, ref: RefLike, name: str) -> bytes:
        manifest = self.manifest(ref)
        entry = file_entry(manifest, name)
        got = self.bucket.get(self._blob_key(entry.sha256))
        if got is None:
            raise IntegrityError(f"{manifest.ref}: file {name!r} points at missing blob "
                                 f"{self.blob_location(entry.sha256)}; the registry is damaged (run `adapterhub "
                                 "registry verify`), re-publish the adapter")
        data = got.data
        if len(data) != entry.size or _sha256(data) != entry.sha256:
            raise IntegrityError(f"{manifest.ref}: file {name!r} ({self.blob_location(entry.sha256)}) no longer "
                                 f"matches its recorded sha256 {entry.sha256[:12]}...; refusing to load it")
        return data

    def materialize(self, ref: RefLike, *, verify: str = "hash") -> Path:
        """The version's directory in the local read cache, verified (see :meth:`ReadCache.materialize`)."""
        return self.cache.materialize(self.manifest(ref), self, verify=verify)

    def read_version(self, ref: RefLike, *, hasher: Executor | None = None) -> VersionRead:
        return self.cache.read_version(self.manifest(ref), self, hasher=hasher)

    def copy_blob(self, sha256: str, out: BinaryIO) -> None:
        self.bucket.copy_to(self._blob_key(sha256), out)

    def blob_location(self, sha256: str) -> str:
        return f"{self.location}/{self._blob_key(sha256)}"

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        task: str,
        adapter_dir: str | Path,
        *,
        parent: str | None = None,
        extra: dict | None = None,
        metadata: Metadata | None = None,
    ) -> Manifest:
        sources, metadata, extra = self._publish_inputs(task, adapter_dir, parent, extra, metadata, self.max_file_bytes)
        with tempfile.TemporaryDirectory(prefix="adapterhub-publish-") as staging:
            # hash a private copy and upload that copy: a file changing under us cannot be stored
            # under another content's hash
            entries = {name: _stage(path, Path(staging) / name, self.max_file_bytes) for name, path in sources.items()}
            digests = sorted({e.sha256 for e in entries.values()})
            for _ in range(3):
                with Lease(self.bucket, digests, wait=self.gc_wait, stale_after=self.lease_ttl) as lease:
                    for name, entry in entries.items():
                        self._put_blob(entry, Path(staging) / name)
                    if lease.age() > self.lease_ttl / 2:
                        continue  # a slow upload: a gc may take its lease for stale; lease again, check again
                    recorded_parent = self._resolve_parent(parent if parent is not None else metadata.parent,
                                                           explicit=parent is not None)
                    manifest = self._allocate(task, metadata, entries, recorded_parent, extra)
                    break
            else:
                raise AdapterHubError(f"publishing to {self.location}: storing the blobs took longer than half the "
                                      f"lease lifetime ({self.lease_ttl:g} s) three times; retry on a faster link")
        log.info("published %s to %s (%d files, %d bytes)", manifest.ref, self.location, len(entries),
                 manifest.total_size)
        return manifest

    def _put_blob(self, entry: FileEntry, staged: Path) -> None:
        """Upload unless the store holds it already (same name, same size: content-addressed)."""
        key = self._blob_key(entry.sha256)
        found = self.bucket.head(key)
        if found is None or found.size != entry.size:
            self.bucket.put(key, staged)

    def _allocate(self, task: str, metadata: Metadata, entries: dict[str, FileEntry], parent: str | None,
                  extra: dict) -> Manifest:
        """Create ``versions/<N>.json`` for the lowest N above every number ever taken (create-only)."""
        version = max(self._numbers(task), default=0) + 1
        for _ in range(10_000):
            manifest = self._new_manifest(task, version, metadata, entries, parent, extra)
            if self.bucket.create(self._manifest_key(task, version), manifest.to_json().encode()):
                self._manifests[task, version] = manifest
                return manifest
            version += 1
        raise AdapterHubError(f"{self.location}: could not allocate a version of {task!r} (10000 numbers taken "
                              "concurrently); retry")

    # -- tags and removal ------------------------------------------------------------------

    def set_tag(self, ref: RefLike, tag: str) -> Manifest:
        validate_tag(tag)
        task, version = self.resolve(ref)
        key = self._tag_key(task, tag)
        for _ in range(self.tag_retries):
            got = self.bucket.get(key)
            try:
                self.bucket.put_if(key, f"{version}\n".encode(), got.version if got else None)
            except LostRace:
                time.sleep(0.001)
                continue
            break
        else:
            raise AdapterHubError(f"{task}@{tag}: the tag was moved by others {self.tag_retries} times while this "
                                  f"move tried to point it at @{version}; retry")
        if not self.has_version(task, version):  # removed meanwhile: take the tag off it again
            self._clear_tag_if(task, tag, version)
            raise NotFound(f"{task}@{version} was removed while {task}@{tag} was being moved to it")
        return self.get_manifest(task, version)

    def _clear_tag_if(self, task: str, tag: str, version: int | None) -> int | None:
        """Empty the tag by CAS if it points at ``version`` (any version when None); the version it had."""
        key = self._tag_key(task, tag)
        for _ in range(self.tag_retries):
            got = self.bucket.get(key)
            current = None if got is None else self._tag_value(task, tag, got.data)
            if current is None or (version is not None and current != version):
                return None
            try:
                self.bucket.put_if(key, b"", got.version)
                return current
            except LostRace:
                continue
        raise AdapterHubError(f"{task}@{tag}: the tag kept moving while it was being removed; retry")

    def remove_tag(self, task: str, tag: str) -> int:
        removed = self._clear_tag_if(task, tag, None)
        if removed is None:
            raise NotFound(f"task {task!r} has no tag {tag!r} (tags: {', '.join(self.tags(task)) or 'none'})")
        return removed

    def remove_version(self, ref: RefLike, *, force: bool = False) -> Manifest:
        task, version = self.resolve(ref)
        manifest = self.get_manifest(task, version)
        tagged = sorted(t for t, v in self.tags(task).items() if v == version)
        if tagged and not force:
            raise AdapterHubError(
                f"{task}@{version} is tagged {', '.join(tagged)}; untag it first "
                f"(adapterhub registry untag {task} {tagged[0]}) or pass --force"
            )
        for tag in tagged:
            self._clear_tag_if(task, tag, version)
        self.bucket.put(self._manifest_key(task, version), b"")  # the number stays taken
        self._manifests.pop((task, version), None)
        for tag, pointed in self.tags(task).items():  # a tag moved onto it meanwhile
            if pointed == version:
                self._clear_tag_if(task, tag, version)
        log.info("removed %s; its blobs are freed by gc", manifest.ref)
        return manifest

    # -- maintenance -----------------------------------------------------------------------

    def verify(self, ref: RefLike | None = None) -> list[Problem]:
        problems: list[Problem] = []
        blobs = {e.name: e.size for e in self.bucket.list("blobs/")}
        hashed: dict[str, str] = {}

        def digest(sha: str) -> str:
            if sha not in hashed:
                out = _Digest()
                try:
                    self.copy_blob(sha, out)
                    hashed[sha] = out.hexdigest()
                except FileNotFoundError:
                    hashed[sha] = ""
            return hashed[sha]

        scope = self._verify_scope(ref, lambda: list(self.bucket.folders("tasks/")))
        for task, only in scope.items():
            try:
                validate_task(task)
            except AdapterHubError as exc:
                problems.append(Problem(f"{self.location}/tasks/{task}", str(exc)))
                continue
            versions = only if only is not None else self.list_versions(task)
            for version in versions:
                problems += self._verify_version(task, version, blobs, digest)
            if only is None:
                problems += self._verify_tags(task, set(versions))
        if ref is None:
            for name in sorted(blobs):
                where = f"{self.location}/blobs/{name}"
                if not _BLOB_RE.fullmatch(name):
                    problems.append(Problem(where, "unexpected object in blobs/ (not a sha256 name)"))
                elif digest(name) != name:
                    problems.append(Problem(where, "blob content does not match its sha256 name"))
        return problems

    def _verify_version(self, task: str, version: int, blobs: dict[str, int], digest) -> list[Problem]:
        try:
            manifest = self.get_manifest(task, version)
        except AdapterHubError as exc:
            return [Problem(f"{self.location}/{self._manifest_key(task, version)}", str(exc))]
        problems = []
        for name, entry in sorted(manifest.files.items()):
            where, blob = f"{manifest.ref}:{name}", self.blob_location(entry.sha256)
            if entry.sha256 not in blobs:
                problems.append(Problem(where, f"missing blob {blob}"))
            elif blobs[entry.sha256] != entry.size:
                problems.append(Problem(where, f"blob {blob} has {blobs[entry.sha256]} bytes, manifest says {entry.size}"))
            elif digest(entry.sha256) != entry.sha256:
                problems.append(Problem(where, f"blob {blob} no longer matches its sha256"))
        return problems

    def _verify_tags(self, task: str, versions: set[int]) -> list[Problem]:
        problems = []
        for entry in self.bucket.list(f"tasks/{task}/refs/"):
            where = f"{self.location}/{entry.path}"
            try:
                validate_tag(entry.name)
                version = self._read_tag(task, entry.name)
            except AdapterHubError as exc:
                problems.append(Problem(where, str(exc)))
                continue
            if version is not None and version not in versions:
                problems.append(Problem(where, f"tag {entry.name!r} points at missing version {task}@{version}"))
        return problems

    def gc(self, *, dry_run: bool = False, stale_after: float | None = None, break_lock: bool = False) -> dict[str, Any]:
        """Delete blobs no manifest and no fresh lease names (see :mod:`.objectgc`)."""
        return collect(self, dry_run=dry_run, stale_after=self.lease_ttl if stale_after is None else stale_after,
                       break_lock=break_lock)


def _stage(source: Path, staged: Path, max_bytes: int | None) -> FileEntry:
    """Copy ``source`` to ``staged`` while hashing the copied bytes (and their chunk digests)."""

    digests = hashing.FileDigests(hashing.chunk_size_for(source.stat().st_size))
    fsutil.copy_hashing(source, staged, digests, max_bytes=max_bytes, fsync=False,
                        on_too_big=lambda size: LimitExceeded(f"{source} grew past max_file_bytes={max_bytes} "
                                                              "while being stored"))
    return digests.entry()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class _Digest:
    """A sink for :meth:`ObjectStore.copy_blob` that only hashes."""

    def __init__(self) -> None:
        import hashlib

        self._h = hashlib.sha256()

    def write(self, data) -> int:
        self._h.update(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
