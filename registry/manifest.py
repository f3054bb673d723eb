"""The version manifest: everything needed to reproduce, trust and load one published adapter.

A manifest is written once and never changed. It is parsed strictly: a manifest that names a file
with a path in it, or a hash that is not a sha256, is refused before any path is built from it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import re
from typing import Any, Mapping

from adapterhub.adapter_files import PICKLE_SUFFIXES
from adapterhub.errors import IntegrityError
from adapterhub.metadata import METADATA_FILE, Metadata, Requirement  # the publish input: adapterhub.json

from .names import Reference, parse_reference, validate_file_name, validate_task

FORMAT = "adapterhub.manifest/1"
MANIFEST_FILE = "manifest.json"  # written next to exports; never stored as a version file
RESERVED_FILES = frozenset({METADATA_FILE, MANIFEST_FILE})

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file's sha256 (its blob's name) and size; for files over one chunk, published since they
    were added, the sha256 of each ``chunk_size`` bytes too, so that two threads can check a load
    (see :mod:`.hashing`). Manifests without them stay valid."""

    sha256: str
    size: int
    chunk_size: int | None = None
    chunks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.chunks:
            data["chunks"] = {"size": self.chunk_size, "sha256": list(self.chunks)}
        return data

    @classmethod
    def from_dict(cls, name: str, entry: Any) -> "FileEntry":
        sha, size = entry["sha256"], entry["size"]
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise ValueError(f"file {name!r} has a malformed sha256 {sha!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"file {name!r} has a malformed size {size!r}")
        chunks = entry.get("chunks")
        if chunks is None:
            return cls(sha, size)
        chunk_size, digests = chunks["size"], chunks["sha256"]
        if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 4096
                or chunk_size & (chunk_size - 1)):
            raise ValueError(f"file {name!r} has a malformed chunk size {chunk_size!r} (a power of two, at least 4096)")
        if not isinstance(digests, list) or len(digests) != max(1, -(-size // chunk_size)):
            raise ValueError(f"file {name!r} of {size} bytes needs {max(1, -(-size // chunk_size))} chunk digests "
                             f"of {chunk_size} bytes each, got {len(digests) if isinstance(digests, list) else digests!r}")
        for digest in digests:
            if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
                raise ValueError(f"file {name!r} has a malformed chunk sha256 {digest!r}")
        return cls(sha, size, chunk_size, tuple(digests))


@dataclasses.dataclass(frozen=True)
class Manifest:
    task: str
    version: int
    method: str
    method_config: dict
    base_name: str
    base_fingerprint: str
    training: dict
    metrics: dict
    files: Mapping[str, FileEntry]
    parent: str | None
    created: str
    software: dict
    extra: dict = dataclasses.field(default_factory=dict)
    requires: tuple[Requirement, ...] = ()
    """Versions it was trained on top of (``train --on``), applied below it when it is served."""

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.version}"

    @property
    def reference(self) -> Reference:
        return Reference(self.task, version=self.version)

    @property
    def digest(self) -> str:
        """What this version IS, in one sha256: its method, method config and files' hashes (not its
        name, time or lineage), so a ``requires`` entry notices another adapter under the same reference."""
        material = {"method": self.method, "method_config": self.method_config,
                    "files": {name: entry.sha256 for name, entry in sorted(self.files.items())}}
        return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()

    def requirement(self) -> Requirement:
        """The ``requires`` entry of an adapter trained on top of this version."""
        return Requirement(self.ref, self.digest)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def metadata(self) -> Metadata:
        """The publish input this version came from, e.g. to write ``adapterhub.json`` on export."""
        return Metadata(
            method=self.method,
            base_fingerprint=self.base_fingerprint,
            base_name=self.base_name,
            method_config=self.method_config,
            training=self.training,
            metrics=self.metrics,
            parent=self.parent,
            requires=self.requires,
        )

    def described_files(self) -> dict[str, bytes]:
        """``adapterhub.json`` and ``manifest.json`` as written next to the files in snapshots and
        exports, so a loaded directory describes itself. Deterministic, hence verifiable."""
        return {METADATA_FILE: self.metadata().to_json().encode(), MANIFEST_FILE: self.to_json().encode()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.task,
            "version": self.version,
            "method": {"name": self.method, "config": self.method_config},
            "base": {"name": self.base_name, "fingerprint": self.base_fingerprint},
            "training": self.training,
            "metrics": self.metrics,
            "parent": self.parent,
            "files": {name: entry.to_dict() for name, entry in sorted(self.files.items())},
            "software": self.software,
            "created": self.created,
            "extra": self.extra,
            # only when there is one: every other manifest serializes byte for byte as before
            **({"requires": [r.to_dict() for r in self.requires]} if self.requires else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: object, *, source: str = "manifest") -> "Manifest":
        """Strict parse: any field that could turn into a path or a hash is validated here."""
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} manifest")
            files: dict[str, FileEntry] = {}
            for name, entry in dict(data["files"]).items():
                validate_file_name(name)
                if name.lower().endswith(PICKLE_SUFFIXES):
                    raise ValueError(f"file {name!r} is a pickle format, which can run code when loaded")
                if name in RESERVED_FILES:
                    raise ValueError(f"reserved file name {name!r}")
                files[name] = FileEntry.from_dict(name, entry)
            if not files:
                raise ValueError("no files")
            parent = data.get("parent")
            if parent is not None:
                parse_reference(parent)
            requires = data.get("requires") or []
            if not isinstance(requires, list):
                raise ValueError(f"'requires' must be a list, got {type(requires).__name__}")
            version = data["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"malformed version {version!r}")
            return cls(
                task=validate_task(data["task"]),
                version=version,
                method=str(data["method"]["name"]),
                method_config=dict(data["method"].get("config") or {}),
                base_name=str(data["base"].get("name") or ""),
                base_fingerprint=str(data["base"]["fingerprint"]),
                training=dict(data.get("training") or {}),
                metrics=dict(data.get("metrics") or {}),
                files=files,
                parent=parent,
                created=str(data["created"]),
                software=dict(data.get("software") or {}),
                extra=dict(data.get("extra") or {}),
                requires=tuple(Requirement.from_dict(r, source=source) for r in requires),
            )
        except IntegrityError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # InvalidReference is a ValueError
            raise IntegrityError(f"{source} is malformed ({type(exc).__name__}: {exc}); the registry may be damaged") from exc


def software_versions() -> dict[str, str]:
    """Versions that shaped the files, read from package metadata (never imports torch)."""
    result = {}
    for dist in ("adapterhub", "peft", "transformers", "safetensors"):
        try:
            result[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result[dist] = "unknown"
    return result


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
