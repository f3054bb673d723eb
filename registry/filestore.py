"""The filesystem registry (layout in the package docstring): the embedded default.

Write order makes crashes harmless: blobs first (each via temp file + ``os.replace``), then, under
the registry lock, the manifest (again temp + replace). A version exists exactly when its manifest
file exists, and a manifest is only written once every blob it names is in place. A process killed
at any point leaves at most ``.incomplete`` temp files and unreferenced blobs, which ``gc`` removes.

Reading writes nothing here: ``materialize`` and ``read_version`` copy blobs (opened read-only) into
the reader's own cache (:mod:`.readcache`), so a read-only registry directory serves every version.
Registries written by earlier versions hold ``snapshots/``; nothing reads them, and ``gc`` removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import filelock

from adapterhub.errors import AdapterHubError, ConfigError, IntegrityError, LimitExceeded, NotFound
from adapterhub.metadata import Metadata

from . import fsutil, hashing
from .manifest import FileEntry, Manifest
from .names import validate_tag, validate_task
from .readcache import ReadCache
from .store import AdapterStore, Problem, RefLike, VersionRead, file_entry, parse_manifest

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 16 * 2**30  # one file; sharded full fine-tunes stay well under this
STALE_TEMP_SECONDS = 24 * 3600  # temp files of writers on other hosts count as dead after this

_VERSION_FILE_RE = re.compile(r"([1-9][0-9]*)\.json")
_BLOB_RE = re.compile(r"[0-9a-f]{64}")


class FileStore(AdapterStore):
    """A registry in one directory; safe for many processes (and hosts on a shared filesystem).

    ``max_file_bytes`` caps each stored file; ``fsync`` can be turned off for throwaway stores;
    ``cache`` is where reads are verified into (default: the user's read cache).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
        lock_timeout: float = 120.0,
        fsync: bool = True,
        cache: ReadCache | None = None,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.cache = cache if cache is not None else ReadCache()
        self.max_file_bytes = max_file_bytes
        self.lock_timeout = lock_timeout
        self.fsync = fsync
        # parsed manifests by (task, version), each with the (inode, mtime, size) of the file it
        # came from: a server resolves a reference per request, and a stat is 50x cheaper than
        # reading and parsing the manifest again (a version's file is replaced, never edited)
        self._manifests: dict[tuple[str, int], tuple[tuple[int, int, int], Manifest]] = {}

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    @property
    def location(self) -> str:
        return str(self.root)

    # -- layout ----------------------------------------------------------------------------

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    def _task_dir(self, task: str) -> Path:
        return self.root / "tasks" / validate_task(task)

    def _manifest_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / "versions" / f"{int(version)}.json"

    def _tag_path(self, task: str, tag: str) -> Path:
        return self._task_dir(task) / "refs" / validate_tag(tag)

    def _counter_path(self, task: str) -> Path:
        return self._task_dir(task) / "last_version"

    def _old_snapshot_dir(self, task: str, version: int) -> Path:
        """Where registries written before the read cache kept a loaded version."""
        return self.root / "snapshots" / validate_task(task) / str(int(version))

    def _blob_path(self, sha256: str) -> Path:
        if not _BLOB_RE.fullmatch(sha256):
            raise IntegrityError(f"malformed blob hash {sha256!r}")
        return self.blobs_dir / sha256

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One registry-wide lock: version allocation, tag moves, removal and gc exclude each other.

        Held only for small metadata writes, never while blobs are copied.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)
        try:
            with lock:
                yield
        except filelock.Timeout as exc:
            raise AdapterHubError(
                f"registry {self.root} is locked by another process for more than {self.lock_timeout:g} s; "
                "retry, or check for a hung adapterhub process"
            ) from exc

    # -- reading ---------------------------------------------------------------------------

    def list_tasks(self) -> list[str]:
        tasks_dir = self.root / "tasks"
        if not tasks_dir.is_dir():
            return []
        result = []
        for entry in sorted(tasks_dir.iterdir()):
            try:
                validate_task(entry.name)
            except AdapterHubError:
                continue
            if self.list_versions(entry.name):
                result.append(entry.name)
        return result

    def list_versions(self, task: str) -> list[int]:
        versions_dir = self._task_dir(task) / "versions"
        try:
            names = os.listdir(versions_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for name in names if (m := _VERSION_FILE_RE.fullmatch(name)))

    def tags(self, task: str) -> dict[str, int]:
        refs_dir = self._task_dir(task) / "refs"
        try:
            names = sorted(os.listdir(refs_dir))
        except FileNotFoundError:
            return {}
        result = {}
        for name in names:
            if name.startswith("."):
                continue
            result[name] = self._read_tag_file(refs_dir / name)
        return result

    def _read_tag_file(self, path: Path) -> int:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text.isdigit() or int(text) < 1:
            raise IntegrityError(f"tag file {path} holds {text[:40]!r}, not a version number")
        return int(text)

    def has_version(self, task: str, version: int) -> bool:
        return self._manifest_path(task, version).is_file()

    def get_manifest(self, task: str, version: int, *, fresh: bool = False) -> Manifest:
        """The parsed manifest; ``fresh`` reads the file even when an unchanged stat says it is
        the one parsed before (what verify does: an in-place edit within the filesystem's
        timestamp granularity keeps the same stat)."""
        path = self._manifest_path(task, version)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise NotFound(f"{task}@{version} does not exist") from None
        seen = stat.st_ino, stat.st_mtime_ns, stat.st_size
        cached = self._manifests.get((task, version))
        if cached is not None and cached[0] == seen and not fresh:
            return cached[1]
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{task}@{version} does not exist") from None
        manifest = parse_manifest(raw, task, version, f"manifest {path}")
        if len(raw) == stat.st_size:  # what was read is what was stat'ed (else: replaced meanwhile)
            self._manifests[task, version] = seen, manifest
        return manifest

    def read_bytes(self, ref: RefLike, name: str) -> bytes:
        manifest = self.manifest(ref)
        entry = file_entry(manifest, name)
        blob = self._existing_blob(manifest, name)
        data = blob.read_bytes()
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise self._corrupt(manifest, name, blob)
        return data

    def _existing_blob(self, manifest: Manifest, name: str) -> Path:
        blob = self._blob_path(manifest.files[name].sha256)
        if not blob.is_file():
            raise IntegrityError(
                f"{manifest.ref}: file {name!r} points at missing blob {blob}; "
                "the registry is damaged (run `adapterhub registry verify`), re-publish the adapter"
            )
        return blob

    def _corrupt(self, manifest: Manifest, name: str, path: Path) -> IntegrityError:
        return IntegrityError(
            f"{manifest.ref}: file {name!r} ({path}) no longer matches its recorded sha256 "
            f"{manifest.files[name].sha256[:12]}...; refusing to load it. Run `adapterhub registry verify` "
            "and re-publish the adapter"
        )

    # -- materialize -----------------------------------------------------------------------

    def materialize(self, ref: RefLike, *, verify: str = "hash") -> Path:
        """The version's directory in the read cache (files + ``adapterhub.json`` + ``manifest.json``),
        copied once from the blobs and checked on every call.

        ``verify="hash"`` (default) re-hashes every file each call: adapters are small, and this is
        what catches bit rot. ``verify="size"`` checks names and sizes only, for hot paths that
        already trust the disk.
        """
        return self.cache.materialize(self.manifest(ref), self, verify=verify)

    def read_version(self, ref: RefLike, *, hasher: Executor | None = None) -> VersionRead:
        """Each file of the cached copy read once; see :meth:`ReadCache.read_version`."""
        return self.cache.read_version(self.manifest(ref), self, hasher=hasher)

    def copy_blob(self, sha256: str, out: BinaryIO) -> None:
        with open(self._blob_path(sha256), "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    def blob_location(self, sha256: str) -> str:
        return str(self._blob_path(sha256))

    # -- writing ---------------------------------------------------------------------------

    def publish(
        self,
        task: str,
        adapter_dir: str | os.PathLike,
        *,
        parent: str | None = None,
        extra: dict | None = None,
        metadata: Metadata | None = None,
    ) -> Manifest:
        sources, metadata, extra = self._publish_inputs(task, adapter_dir, parent, extra, metadata, self.max_file_bytes)
        entries = {name: self._store_blob(path) for name, path in sources.items()}
        with self._locked():
            recorded_parent = self._resolve_parent(parent if parent is not None else metadata.parent, explicit=parent is not None)
            for name, entry in entries.items():
                blob = self._blob_path(entry.sha256)
                if not blob.is_file() or blob.stat().st_size != entry.size:  # a concurrent gc took it
                    entries[name] = self._store_blob(sources[name])
            version = self._next_version(task)
            manifest = self._new_manifest(task, version, metadata, entries, recorded_parent, extra)
            fsutil.write_atomic(self._manifest_path(task, version), manifest.to_json().encode(), fsync=self.fsync)
            fsutil.write_atomic(self._counter_path(task), f"{version}\n".encode(), fsync=self.fsync)
        log.info("published %s (%d files, %d bytes)", manifest.ref, len(entries), manifest.total_size)
        return manifest

    def _next_version(self, task: str) -> int:
        """Never reuse a number, even after ``rm``: the counter remembers the highest ever."""
        highest = max(self.list_versions(task), default=0)
        counter = self._counter_path(task)
        if counter.exists():
            highest = max(highest, self._read_tag_file(counter))
        return highest + 1

    def _store_blob(self, source: Path) -> FileEntry:
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = fsutil.temp_path(self.blobs_dir / "blob")

        def too_big(size: int) -> Exception:
            return LimitExceeded(f"{source} grew past max_file_bytes={self.max_file_bytes} while being stored")

        digests = hashing.FileDigests(hashing.chunk_size_for(source.stat().st_size))
        fsutil.copy_hashing(source, tmp, digests, max_bytes=self.max_file_bytes, fsync=self.fsync, on_too_big=too_big)
        entry = digests.entry()
        final = self._blob_path(entry.sha256)
        try:
            if final.is_file() and final.stat().st_size == entry.size:
                os.unlink(tmp)  # same content already stored; keep its inode (snapshots link to it)
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return entry

    def set_tag(self, ref: RefLike, tag: str) -> Manifest:
        validate_tag(tag)
        with self._locked():
            task, version = self.resolve(ref)
            fsutil.write_atomic(self._tag_path(task, tag), f"{version}\n".encode(), fsync=self.fsync)
        return self.get_manifest(task, version)

    def remove_tag(self, task: str, tag: str) -> int:
        path = self._tag_path(task, tag)
        with self._locked():
            try:
                version = self._read_tag_file(path)
            except FileNotFoundError:
                raise NotFound(f"task {task!r} has no tag {tag!r} (tags: {', '.join(self.tags(task)) or 'none'})") from None
            os.unlink(path)
        return version

    def remove_version(self, ref: RefLike, *, force: bool = False) -> Manifest:
        with self._locked():
            task, version = self.resolve(ref)
            manifest = self.get_manifest(task, version)
            tagged = sorted(t for t, v in self.tags(task).items() if v == version)
            if tagged and not force:
                raise AdapterHubError(
                    f"{task}@{version} is tagged {', '.join(tagged)}; untag it first "
                    f"(adapterhub registry untag {task} {tagged[0]}) or pass --force"
                )
            counter = self._counter_path(task)
            if not counter.exists() or self._read_tag_file(counter) < version:
                fsutil.write_atomic(counter, f"{version}\n".encode(), fsync=self.fsync)
            for tag in tagged:
                os.unlink(self._tag_path(task, tag))
            os.unlink(self._manifest_path(task, version))
            fsutil.remove_tree(self._old_snapshot_dir(task, version))
        log.info("removed %s; its blobs are freed by gc", manifest.ref)
        return manifest

    # -- maintenance -----------------------------------------------------------------------

    def verify(self, ref: RefLike | None = None) -> list[Problem]:
        problems: list[Problem] = []
        blob_entries: dict[tuple[str, int | None], FileEntry] = {}

        def blob_matches(sha: str, chunk_size: int | None = None, chunks: tuple[str, ...] = ()) -> bool:
            """The blob's bytes have this sha256 (and these chunk digests)."""
            key = sha, chunk_size
            if key not in blob_entries:
                digests = hashing.FileDigests(chunk_size)
                fsutil.hash_file(self._blob_path(sha), digests)
                blob_entries[key] = digests.entry()
            found = blob_entries[key]
            return found.sha256 == sha and found.chunks == chunks

        tasks_dir = self.root / "tasks"
        scope = self._verify_scope(ref, lambda: sorted(e.name for e in tasks_dir.iterdir()) if tasks_dir.is_dir() else [])

        for task, only in scope.items():
            try:
                validate_task(task)
            except AdapterHubError as exc:
                problems.append(Problem(str(self.root / "tasks" / task), str(exc)))
                continue
            versions = only if only is not None else self.list_versions(task)
            for version in versions:
                problems += self._verify_version(task, version, blob_matches)
            if only is None:
                problems += self._verify_tags(task)

        if ref is None and self.blobs_dir.is_dir():
            for path in sorted(self.blobs_dir.iterdir()):
                if fsutil.is_temp(path):
                    continue
                if not _BLOB_RE.fullmatch(path.name):
                    problems.append(Problem(str(path), "unexpected file in blobs/ (not a sha256 name)"))
                elif not blob_matches(path.name):
                    problems.append(Problem(str(path), "blob content does not match its sha256 name"))
        return problems

    def _verify_version(self, task: str, version: int, blob_matches) -> list[Problem]:
        try:
            manifest = self.get_manifest(task, version, fresh=True)
        except AdapterHubError as exc:
            return [Problem(str(self._manifest_path(task, version)), str(exc))]
        problems = []
        for name, entry in sorted(manifest.files.items()):
            blob = self._blob_path(entry.sha256)
            where = f"{manifest.ref}:{name}"
            if not blob.is_file():
                problems.append(Problem(where, f"missing blob {blob}"))
            elif blob.stat().st_size != entry.size:
                problems.append(Problem(where, f"blob {blob} has {blob.stat().st_size} bytes, manifest says {entry.size}"))
            elif not blob_matches(entry.sha256):
                problems.append(Problem(where, f"blob {blob} no longer matches its sha256"))
            elif entry.chunks and not blob_matches(entry.sha256, entry.chunk_size, entry.chunks):
                problems.append(Problem(where, f"the manifest's chunk digests do not match blob {blob} (whose sha256 "
                                               "does): loads of this version fail; re-publish it"))
        return problems

    def _verify_tags(self, task: str) -> list[Problem]:
        refs_dir = self._task_dir(task) / "refs"
        if not refs_dir.is_dir():
            return []
        problems = []
        versions = set(self.list_versions(task))
        for path in sorted(refs_dir.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                validate_tag(path.name)
                version = self._read_tag_file(path)
            except AdapterHubError as exc:
                problems.append(Problem(str(path), str(exc)))
                continue
            if version not in versions:
                problems.append(Problem(str(path), f"tag {path.name!r} points at missing version {task}@{version}"))
        return problems

    def gc(self, *, dry_run: bool = False, stale_after: float = STALE_TEMP_SECONDS,
           break_lock: bool = False) -> dict[str, Any]:
        """Free what no manifest needs, and the ``snapshots/`` that earlier versions built here.
        Refuses to run if any manifest is unreadable.

        Runs under the registry lock, so no manifest can appear mid-scan; a publisher whose blob
        is removed before it takes the lock re-stores the blob before writing its manifest.
        """
        if break_lock:
            raise ConfigError(f"--break-lock is for registries on object stores; {self.root} is guarded by a file "
                              "lock, which goes with the process that held it")
        report: dict[str, Any] = {"blobs_removed": [], "bytes_freed": 0, "temp_removed": [], "snapshots_removed": []}
        if not self.root.is_dir():
            return report
        with self._locked():
            referenced: set[str] = set()
            tasks_dir = self.root / "tasks"
            task_names = sorted(p.name for p in tasks_dir.iterdir()) if tasks_dir.is_dir() else []
            for task in task_names:
                try:
                    validate_task(task)
                except AdapterHubError:
                    continue
                for version in self.list_versions(task):
                    manifest = self.get_manifest(task, version)  # IntegrityError aborts gc: be safe
                    referenced.update(e.sha256 for e in manifest.files.values())

            def remove(path: Path, key: str) -> None:
                report[key].append(str(path))
                if not dry_run:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)

            if self.blobs_dir.is_dir():
                for path in sorted(self.blobs_dir.iterdir()):
                    if fsutil.is_temp(path):
                        if fsutil.is_stale_temp(path, stale_after=stale_after):
                            remove(path, "temp_removed")
                    elif _BLOB_RE.fullmatch(path.name) and path.name not in referenced:
                        report["bytes_freed"] += path.stat().st_size
                        remove(path, "blobs_removed")
            snapshots_dir = self.root / "snapshots"
            for task_dir in sorted(snapshots_dir.iterdir()) if snapshots_dir.is_dir() else []:
                if not task_dir.is_dir():
                    continue
                for path in sorted(task_dir.iterdir()):
                    if fsutil.is_temp(path):
                        if fsutil.is_stale_temp(path, stale_after=stale_after):
                            remove(path, "temp_removed")
                    else:  # nothing reads snapshots since the read cache took their place
                        remove(path, "snapshots_removed")
            for task in task_names:
                for sub in ("versions", "refs", ""):
                    folder = tasks_dir / task / sub
                    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                        if fsutil.is_stale_temp(path, stale_after=stale_after):
                            remove(path, "temp_removed")
        return report
