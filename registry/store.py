"""The abstract store: what the CLI, loader and server may ask of a registry backend.

Kept small (in the spirit of mlflow's abstract model-registry store) so another backend, e.g. an
object store, can come later without touching callers. ``FileStore`` is the one implementation.
"""

from __future__ import annotations

import abc
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable, Union

from adapterhub.errors import NotFound

from .manifest import Manifest
from .names import Reference, parse_reference

RefLike = Union[str, Reference, Manifest]


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
    def gc(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Remove unreferenced blobs, stale snapshots and temp files left by dead writers."""

    # -- shared behaviour ------------------------------------------------------------------

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
