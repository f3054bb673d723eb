"""The server's only dependency on the registry: resolve a reference, fetch a version's files.

Kept in one small module so a registry API change is fixed here and nowhere else. The registry may
be a directory or an object-store URL (a ``RegistryLocation`` carries its options and read cache);
either way the server reads verified copies from its own read cache and never writes the registry.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from adapterhub.adapter_files import AdapterFiles
from adapterhub.errors import IntegrityError, LimitExceeded
from adapterhub.registry import open_registry
from adapterhub.registry.requires import bottoms

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterVersion:
    """One immutable registry version, as much as the server needs to know about it."""

    task: str
    version: int
    method: str
    base_fingerprint: str
    base_name: str
    manifest: Any = dataclasses.field(default=None, compare=False, repr=False)  # spares a load re-reading it

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.version}"


class AdapterSource:
    """Resolves references (``task``, ``task@N``, ``task@tag``) against a registry (directory or URL)."""

    def __init__(self, registry: Any = None, *, max_bytes: int | None = None):
        """``registry``: a path, a URL or a ``RegistryLocation`` (None: ``$ADAPTERHUB_HOME``, ~/.adapterhub)."""

        self.store = open_registry(registry)
        self.max_bytes = max_bytes
        # sha256 of what a load read runs here while the loading thread builds the form from the
        # same bytes (hashlib releases the GIL, so the two use both cores)
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-sha256")

    def resolve(self, ref: str) -> AdapterVersion:
        """Malformed -> InvalidReference; unknown task/version/tag -> NotFound (both from the registry)."""
        manifest = self.store.manifest(ref)
        return AdapterVersion(
            task=manifest.task,
            version=manifest.version,
            method=manifest.method,
            base_fingerprint=manifest.base_fingerprint,
            base_name=manifest.base_name,
            manifest=manifest,
        )

    def bottoms(self, version: AdapterVersion) -> list[Any]:
        """The manifests of the versions ``version`` was trained on top of, deepest first, each
        checked (present, unchanged, same base, no cycle); empty for most adapters."""
        manifest = version.manifest or self.store.manifest(version.ref)
        return bottoms(self.store, manifest) if manifest.requires else []

    def read(self, version: AdapterVersion) -> AdapterFiles:
        """The version's files, each read once; their sha256 checks run in the background.

        The caller builds what it needs from the bytes meanwhile, and must call ``check()`` before
        using the result. Refused before any read when a file is over ``max_bytes``.
        """
        manifest = version.manifest or self.store.manifest(version.ref)
        self._check_sizes(manifest)
        read = self.store.read_version(manifest, hasher=self._hasher)
        return AdapterFiles(read.data, read.directory, check=read.check, check_directory=read.check_directory)

    def materialize(self, version: AdapterVersion) -> Path:
        """A verified directory with the version's files; refused before any read when over ``max_bytes``."""
        manifest = self.store.manifest(version.ref)
        self._check_sizes(manifest)
        return Path(self.store.materialize(manifest))

    def _check_sizes(self, manifest) -> None:
        if self.max_bytes is None:
            return

        for name, entry in manifest.files.items():
            if entry.size > self.max_bytes:
                raise LimitExceeded(
                    f"adapter {manifest.ref}: file {name} is {entry.size} bytes, over this server's limit of "
                    f"{self.max_bytes} (--max-adapter-bytes); raise the limit or publish a smaller adapter")

    def catalog(self, base_fingerprint: str) -> Iterator[tuple[str, AdapterVersion]]:
        """Every version trained on ``base_fingerprint``, then every tag pointing at one: (name, version),
        tasks sorted, versions ascending. Lazy: a caller that pages reads only the manifests it shows.

        A damaged manifest or tag file leaves out that version or tag (logged once per listing): one
        bad entry must not hide the whole catalog; loading it still fails with the registry's error."""
        for task in self.store.list_tasks():
            versions = {}
            for number in self.store.list_versions(task):
                try:
                    manifest = self.store.get_manifest(task, number)
                except IntegrityError as exc:
                    log.warning("the model list leaves out %s@%d: %s", task, number, exc)
                    continue
                if manifest.base_fingerprint and manifest.base_fingerprint != base_fingerprint:
                    continue
                versions[number] = AdapterVersion(manifest.task, manifest.version, manifest.method,
                                                  manifest.base_fingerprint, manifest.base_name, manifest)
                yield versions[number].ref, versions[number]
            try:
                tags = self.store.tags(task)
            except IntegrityError as exc:
                log.warning("the model list leaves out the tags of %s: %s", task, exc)
                continue
            for tag, number in sorted(tags.items()):
                if number in versions:
                    yield f"{task}@{tag}", versions[number]

    def describe(self) -> str:
        return self.store.location
