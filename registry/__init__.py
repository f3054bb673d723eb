"""The versioned adapter registry: immutable, content-addressed versions per task, mutable tags.

Location: ``--registry DIR``, else ``$ADAPTERHUB_HOME``, else ``~/.adapterhub``.

Layout (after huggingface_hub's cache: blobs by hash, small refs, snapshots to load from)::

    <root>/
      .lock                              filelock: version allocation, tags, rm, gc
      blobs/<sha256>                     file bytes, named by their hash, read-only
      tasks/<task>/versions/<N>.json     immutable manifest of <task>@<N>; the version exists iff this does
      tasks/<task>/refs/<tag>            "N\\n": the version a tag points at (moved with os.replace)
      tasks/<task>/last_version          highest number ever allocated, so numbers are never reused
      snapshots/<task>/<N>/<file>        hard links to blobs (copies where links fail), built on load,
                                         plus adapterhub.json + manifest.json written from the manifest

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

from .filestore import DEFAULT_MAX_FILE_BYTES, FileStore
from .manifest import FileEntry, Manifest
from .names import Reference, parse_reference, validate_file_name, validate_tag, validate_task
from .store import AdapterStore, Problem, RefLike
from .transfer import export_dir, import_dir

HOME_ENV = "ADAPTERHUB_HOME"


def registry_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$ADAPTERHUB_HOME``, else ``~/.adapterhub``."""
    if path:
        return Path(path).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    return Path.home() / ".adapterhub"


def open_registry(path: str | os.PathLike | None = None, **options) -> FileStore:
    """The registry at ``path`` (resolved as above); ``options`` go to ``FileStore``."""
    return FileStore(registry_path(path), **options)


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
