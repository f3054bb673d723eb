"""The versioned adapter registry: immutable, content-addressed versions per task, mutable tags.

Location: ``--registry DIR|URL``, else ``$ADAPTERHUB_HOME``, else ``~/.adapterhub``. A directory is the
embedded :class:`FileStore` (layout below); an ``s3://``, ``gs://``, ``az://``, ``file://`` or
``memory://`` URL is an :class:`ObjectStore` with the same semantics (its layout and concurrency
argument: :mod:`.objectstore`, :mod:`.objectgc`; URL forms and options: :mod:`.location`). The two
layouts differ, so one directory is either a FileStore (opened by path) or a ``file://`` registry.

Readers never write to the registry: ``materialize`` and ``read_version`` verify each version into
a local read cache of the reader's own (:mod:`.readcache`).

FileStore layout (after huggingface_hub's cache: blobs by hash, small refs)::

    <root>/
      .lock                              filelock: version allocation, tags, rm, gc
      blobs/<sha256>                     file bytes, named by their hash, read-only
      tasks/<task>/versions/<N>.json     immutable manifest of <task>@<N>; the version exists iff this does
      tasks/<task>/refs/<tag>            "N\\n": the version a tag points at (moved with os.replace)
      tasks/<task>/last_version          highest number ever allocated, so numbers are never reused
      snapshots/                         only in registries written before the read cache; gc removes it

References: ``task`` and ``task@latest`` mean the highest existing version (computed, never
stored), ``task@N`` a version, ``task@TAG`` a tag. Task and tag names: 1-100 characters of
``A-Z a-z 0-9 . _ -``, starting with a letter or digit, no ``..``; tags cannot be all digits or
``latest``.

Crash safety: every file is written to ``.<name>.<host>-<pid>-<rand>.incomplete`` in its final
directory and published with ``os.replace``; blobs are written before the manifest, which is
written under the lock. A killed writer leaves only temp files and unreferenced blobs; ``gc``
removes them (a temp file is stale when its pid is dead on this host, or after 24 h).

Integrity: ``materialize`` re-hashes every file on every call by default (adapters are small;
pass ``verify="size"`` for names+sizes only), ``read_bytes``/``open`` hash what they return, and
a missing or changed blob raises ``IntegrityError`` naming the file. Pickle formats are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterhub.metadata import Metadata, check_base

from typing import Any, Mapping

from .filestore import DEFAULT_MAX_FILE_BYTES, FileStore
from .location import HOME_ENV, RegistryLocation, resolve_location
from .manifest import FileEntry, Manifest
from .names import Reference, parse_reference, validate_file_name, validate_tag, validate_task
from .readcache import ReadCache
from .store import AdapterStore, Problem, RefLike
from .transfer import export_dir, import_dir


def registry_path(path: str | os.PathLike | None = None) -> Path:
    """A directory registry's path: ``path``, else ``$ADAPTERHUB_HOME``, else ``~/.adapterhub``."""
    if path:
        return Path(path).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    return Path.home() / ".adapterhub"


def open_registry(
    path: str | os.PathLike | RegistryLocation | None = None,
    *,
    options: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_max_bytes: int | str | None = None,
    **store_options: Any,
) -> AdapterStore:
    """The registry at ``path`` (a directory, a URL or a :class:`RegistryLocation`; default as above).

    ``options`` go to obstore for URLs (endpoint, region, ...); ``cache_dir``/``cache_max_bytes``
    set the read cache; ``store_options`` go to the store (e.g. ``max_file_bytes``).
    """
    location = resolve_location(path, options=options, cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
    cache = ReadCache(location.cache_dir, max_bytes=location.cache_max_bytes)
    if location.is_url:
        from .objectstore import ObjectStore  # imports obstore only when a URL is opened

        return ObjectStore(location, cache=cache, **store_options)
    return FileStore(location.target, cache=cache, **store_options)


def publish(
    task: str,
    adapter_dir: str | os.PathLike,
    *,
    parent: str | None = None,
    extra: dict | None = None,
    registry: str | os.PathLike | None = None,
) -> Manifest:
    """Publish ``adapter_dir`` (with its ``adapterhub.json``) as the next version of ``task``."""
    return open_registry(registry).publish(task, adapter_dir, parent=parent, extra=extra)


def materialize(ref: RefLike, *, registry: str | os.PathLike | None = None, verify: str = "hash") -> Path:
    """A verified directory with the files of ``ref`` (a reference string or a Manifest)."""
    return open_registry(registry).materialize(ref, verify=verify)


__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "AdapterStore",
    "FileEntry",
    "FileStore",
    "HOME_ENV",
    "Manifest",
    "Metadata",
    "Problem",
    "ReadCache",
    "RegistryLocation",
    "Reference",
    "check_base",
    "export_dir",
    "import_dir",
    "materialize",
    "open_registry",
    "parse_reference",
    "publish",
    "registry_path",
    "validate_file_name",
    "validate_tag",
    "validate_task",
]
