"""The abstract store: what the CLI, loader and server may ask of a registry backend.

Kept small (in the spirit of mlflow's abstract model-registry store) so that callers never know
which backend they hold: ``FileStore`` (a local directory, the embedded default) and
``ObjectStore`` (S3, GCS, Azure, ``file://`` and ``memory://`` URLs over obstore) implement it with
the same semantics. What both share (reference resolution, the checks before a publish writes
anything, the manifest a publish records) lives here.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Union

from adapterhub.errors import ConfigError, IntegrityError, InvalidReference, NotFound
from adapterhub.metadata import METADATA_FILE, Metadata, read_metadata

from .adapterdir import adapter_files
from .manifest import FileEntry, Manifest, software_versions, utc_now
from .names import Reference, parse_reference, validate_task
from .requires import check_requirements

RefLike = Union[str, Reference, Manifest]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found wrong: where, and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclasses.dataclass
class VersionRead:
    """A version's files, each read into memory once, and ``check`` for those same bytes.

    ``check()`` hashes the bytes that were read against the manifest and raises IntegrityError
    naming the file on a mismatch: nothing separates the check from the use. It is separate so a
    caller can work on ``data`` while the hashing runs in another thread (hashlib releases the
    GIL); whatever is built from ``data`` must not be used before ``check()`` returned.
    """

    manifest: Manifest
    directory: Path
    data: dict[str, bytes | bytearray]
    check: Callable[[], None]
    # for code that reads ``directory`` itself: its names and sizes still match the manifest
    check_directory: Callable[[], None] = lambda: None


class AdapterStore(abc.ABC):
    """A versioned, content-addressed adapter store.

    Versions are numbered per task from 1, immutable once visible, and never reused. ``latest`` is
    computed (the highest existing version), so it cannot drift from the versions.
    """

    # -- writing ---------------------------------------------------------------------------

    @abc.abstractmethod
    def publish(
        self,
        task: str,
        adapter_dir: str | Path,
        *,
        parent: str | None = None,
        extra: dict | None = None,
        metadata: Any = None,
    ) -> Manifest:
        """Store the adapter directory as the next version of ``task``; visible only when complete.

        ``metadata`` (a ``Metadata``) replaces ``adapter_dir/adapterhub.json``, for imports of
        plain PEFT directories.
        """

    @abc.abstractmethod
    def set_tag(self, ref: RefLike, tag: str) -> Manifest:
        """Point ``tag`` at the version ``ref`` names (atomically; an existing tag moves)."""

    @abc.abstractmethod
    def remove_tag(self, task: str, tag: str) -> int:
        """Remove a tag; returns the version it pointed at."""

    @abc.abstractmethod
    def remove_version(self, ref: RefLike, *, force: bool = False) -> Manifest:
        """Delete a version; a tagged version only with ``force`` (its tags go too)."""

    # -- reading ---------------------------------------------------------------------------

    @abc.abstractmethod
    def list_tasks(self) -> list[str]:
        """Tasks with at least one visible version, sorted."""

    @abc.abstractmethod
    def list_versions(self, task: str) -> list[int]:
        """Visible versions of ``task``, ascending (empty when the task does not exist)."""

    @abc.abstractmethod
    def tags(self, task: str) -> dict[str, int]:
        """Stored tags of ``task`` -> version (``latest`` is computed, never stored)."""

    @abc.abstractmethod
    def get_manifest(self, task: str, version: int) -> Manifest:
        """The manifest of one version; NotFound when it does not exist."""

    @abc.abstractmethod
    def materialize(self, ref: RefLike) -> Path:
        """A read-only directory holding the version's files, verified against their hashes."""

    @abc.abstractmethod
    def read_bytes(self, ref: RefLike, name: str) -> bytes:
        """One file of a version, verified against its hash."""

    def read_version(self, ref: RefLike, *, hasher: Any = None) -> VersionRead:
        """Every file of a version in memory, with their hash check (see :class:`VersionRead`).

        ``hasher``: a single-thread ``concurrent.futures.Executor`` the backend may hash in. This
        default checks, then reads the checked directory again; backends override it to read each
        file once.
        """
        manifest = self.manifest(ref)
        directory = self.materialize(manifest)
        data = {name: (Path(directory) / name).read_bytes() for name in manifest.files}
        return VersionRead(manifest, directory, data, lambda: None)

    # -- maintenance -----------------------------------------------------------------------

    @abc.abstractmethod
    def verify(self, ref: RefLike | None = None) -> list[Problem]:
        """Re-hash everything (or one task / version); an empty list means all is well."""

    @abc.abstractmethod
    def gc(self, *, dry_run: bool = False, break_lock: bool = False) -> dict[str, Any]:
        """Remove unreferenced blobs, stale snapshots and temp files left by dead writers.

        ``break_lock``: remove a lock left by a gc that died (object stores; a directory's lock is a
        file lock, which dies with its holder).
        """

    # -- shared behaviour ------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The registry's path or URL as messages show it (never a secret)."""
        return str(self)

    def _publish_inputs(self, task: str, adapter_dir: str | Path, parent: str | None, extra: dict | None,
                        metadata: Metadata | None, max_file_bytes: int | None) -> tuple[dict[str, Path], Metadata, dict]:
        """(files to store by name, metadata, extra), every refusal made before anything is written."""
        validate_task(task)
        adapter_dir = Path(adapter_dir)
        sources = adapter_files(adapter_dir, max_file_bytes=max_file_bytes)
        if metadata is None:
            metadata = read_metadata(adapter_dir)
        if extra is not None and not isinstance(extra, dict):
            raise ConfigError(f"extra must be a dict of JSON values, got {type(extra).__name__}")
        extra = dict(extra or {})
        try:
            json.dumps(extra)  # refuse unserializable extras before anything is written
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra is not JSON-serializable: {exc}") from exc
        if parent is not None:
            parse_reference(parent)
        elif metadata.parent is not None:  # adapterhub.json may name a directory (continued with --from DIR)
            try:
                parse_reference(metadata.parent)
            except InvalidReference as exc:
                raise InvalidReference(f"{adapter_dir / METADATA_FILE}: parent {metadata.parent!r} is not a registry "
                                       f"reference ({exc}); publish with parent=REF (--parent) instead") from None
        check_requirements(self, metadata.requires, task, metadata.base_fingerprint)  # train --on: bottoms here first
        return sources, metadata, extra

    def _new_manifest(self, task: str, version: int, metadata: Metadata, files: dict[str, FileEntry],
                      parent: str | None, extra: dict) -> Manifest:
        return Manifest(
            task=task,
            version=version,
            method=metadata.method,
            method_config=metadata.method_config,
            base_name=metadata.base_name,
            base_fingerprint=metadata.base_fingerprint,
            training=metadata.training,
            metrics=metadata.metrics,
            files=files,
            parent=parent,
            created=utc_now(),
            software=software_versions(),
            extra=extra,
            requires=metadata.requires,
        )

    def _resolve_parent(self, parent: str | None, *, explicit: bool) -> str | None:
        """Record the parent pinned (``task@N``) so a moving tag cannot rewrite history.

        A pinned parent that is not in this registry (e.g. an import from elsewhere) is kept as
        given; an unpinned one must resolve here.
        """
        if parent is None:
            return None
        reference = parse_reference(parent)
        try:
            task, version = self.resolve(reference)
        except NotFound:
            if explicit or reference.version is None:
                raise
            log.info("parent %s is not in this registry; recording it as given", reference)
            return str(reference)
        return f"{task}@{version}"

    def resolve(self, ref: RefLike) -> tuple[str, int]:
        """``task``, ``task@N``, ``task@TAG`` or a Manifest -> (task, version), or NotFound."""
        if isinstance(ref, Manifest):
            return ref.task, ref.version
        reference = parse_reference(ref)
        task = reference.task
        if reference.version is not None:
            if not self.has_version(task, reference.version):
                known = self.list_versions(task)
                hint = f"known versions: {_ranges(known)}" if known else self._task_hint(task)
                raise NotFound(f"{reference} does not exist; {hint}")
            return task, reference.version
        if reference.is_latest:
            versions = self.list_versions(task)
            if not versions:
                raise NotFound(f"task {task!r} has no versions; {self._task_hint(task)}")
            return task, versions[-1]
        tags = self.tags(task)
        if reference.tag not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise NotFound(f"{reference}: no tag {reference.tag!r} on task {task!r} (tags: {known})")
        return task, tags[reference.tag]

    def has_version(self, task: str, version: int) -> bool:
        """Whether ``task@version`` exists (stores answer faster than listing every version)."""
        return version in self.list_versions(task)

    def manifest(self, ref: RefLike) -> Manifest:
        if isinstance(ref, Manifest):
            return ref
        return self.get_manifest(*self.resolve(ref))

    def open(self, ref: RefLike, name: str) -> io.BytesIO:
        """A verified file as a binary stream (e.g. for ``safetensors.safe_load`` from bytes)."""
        return io.BytesIO(self.read_bytes(ref, name))

    def _verify_scope(self, ref: RefLike | None, every_task: Callable[[], list[str]]) -> dict[str, list[int] | None]:
        """What ``verify(ref)`` covers, task -> versions (None: all of them and the task's tags): every
        task the backend lists (``every_task()``, names unchecked: verify reports bad ones), one task, or
        one version."""
        if ref is None:
            return {task: None for task in every_task()}
        if isinstance(ref, Manifest) or parse_reference(ref).explicit:
            task, version = self.resolve(ref)
            return {task: [version]}
        task = parse_reference(ref).task
        if not self.list_versions(task):
            raise NotFound(f"task {task!r} has no versions; {self._task_hint(task)}")
        return {task: None}

    def _task_hint(self, task: str) -> str:
        tasks = self.list_tasks()
        return f"known tasks: {', '.join(tasks)}" if tasks else "the registry is empty"


def _ranges(numbers: list[int]) -> str:
    """[1,2,3,5] -> '1-3, 5': keeps NotFound messages short for tasks with many versions."""
    parts: list[str] = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if start != prev else str(start))
        start = prev = n
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(parts)


def parse_manifest(raw: bytes, task: str, version: int, where: str) -> Manifest:
    """A stored manifest's bytes, checked to be JSON of a manifest and to describe ``task@version``."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{where} is not valid JSON ({exc}); the registry may be damaged") from exc
    manifest = Manifest.from_dict(data, source=where)
    if (manifest.task, manifest.version) != (task, version):
        raise IntegrityError(f"{where} describes {manifest.ref}, not {task}@{version}")
    return manifest


def file_entry(manifest: Manifest, name: str) -> FileEntry:
    """The manifest's entry for file ``name``; NotFound naming the files it has."""
    if name not in manifest.files:
        raise NotFound(f"{manifest.ref} has no file {name!r} (files: {', '.join(sorted(manifest.files))})")
    return manifest.files[name]
