"""The server's only dependency on the registry: resolve a reference, fetch a version's files.

Kept in one small module so a registry API change is fixed here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class AdapterVersion:
    """One immutable registry version, as much as the server needs to know about it."""

    task: str
    version: int
    method: str
    base_fingerprint: str
    base_name: str

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.version}"


class AdapterSource:
    """Resolves references (``task``, ``task@N``, ``task@tag``) against a registry directory."""

    def __init__(self, registry: str | os.PathLike | None = None, *, max_bytes: int | None = None):
        from adapterhub.registry import open_registry

        self.store = open_registry(registry)
        self.max_bytes = max_bytes

    def resolve(self, ref: str) -> AdapterVersion:
        """Malformed -> InvalidReference; unknown task/version/tag -> NotFound (both from the registry)."""
        manifest = self.store.manifest(ref)
        return AdapterVersion(
            task=manifest.task,
            version=manifest.version,
            method=manifest.method,
            base_fingerprint=manifest.base_fingerprint,
            base_name=manifest.base_name,
        )

    def materialize(self, version: AdapterVersion) -> Path:
        """A verified directory with the version's files; refused before any read when over ``max_bytes``."""
        if self.max_bytes is not None:
            from adapterhub.errors import LimitExceeded

            manifest = self.store.manifest(version.ref)
            for name, entry in manifest.files.items():
                if entry.size > self.max_bytes:
                    raise LimitExceeded(
                        f"adapter {version.ref}: file {name} is {entry.size} bytes, over this server's limit of "
                        f"{self.max_bytes} (--max-adapter-bytes); raise the limit or publish a smaller adapter")
        return Path(self.store.materialize(version.ref))

    def describe(self) -> str:
        return str(getattr(self.store, "root", self.store))
