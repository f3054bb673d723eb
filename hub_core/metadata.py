"""``adapterhub.json``: what an adapter directory says about its adapter, defined once.

An adapter directory holds its method's own files plus ``adapterhub.json``: the method that wrote
it, that method's config, the base model it was trained on (name and fingerprint), how it was
trained, its metrics and the adapter it continued (``parent``). The host writes it when it saves an
adapter and reads it when it loads or continues one; the registry reads it on publish, keeps it in
the version's manifest and writes it back beside snapshots and exports. Both use this module (the
field names, reading, validation and the base check), which imports neither torch nor the plugins.

Plain PEFT directories have no ``adapterhub.json``; their method comes from ``adapter_config.json``
(:func:`peft_method`): its ``peft_type``, and the flag a method declares as its ``peft_variant``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import BaseMismatch, ConfigError

log = logging.getLogger(__name__)

METADATA_FILE = "adapterhub.json"

# (peft_type, variant flag) -> the built-in method that reads plain PEFT directories of that format.
# Derived from the built-in methods' own peft_type / peft_variant (PluginManager.peft_formats), and
# written out here only so that the registry can tell a plain PEFT directory's method without
# importing the plugins (and torch). Generated: `python -m adapterhub.capabilities_table --write
# README.md` rewrites it; tests/test_plugins.py fails when it differs from the derived table.
BUILTIN_PEFT_FORMATS: dict[tuple[str, str | None], str] = {
    # peft-formats:begin
    ("ADALORA", None): "adalora",
    ("IA3", None): "ia3",
    ("LORA", None): "lora",
    ("LORA", "use_dora"): "dora",
    ("PREFIX_TUNING", None): "prefix",
    ("PROMPT_TUNING", None): "prompt",
    ("P_TUNING", None): "ptuning",
    ("SHIRA", None): "sparse",
    # peft-formats:end
}


_PINNED_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[1-9][0-9]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Requirement:
    """An adapter this one was trained on top of (``train --on``): the pinned version and the digest
    of what that version is (``Manifest.digest``: method, config and file hashes). The server applies
    it below this one; a registry holding another adapter under that reference is caught by the digest."""

    ref: str
    digest: str

    def to_dict(self) -> dict[str, str]:
        return {"ref": self.ref, "digest": self.digest}

    @classmethod
    def from_dict(cls, data: object, *, source: str = METADATA_FILE) -> "Requirement":
        ref = data.get("ref") if isinstance(data, dict) else None
        digest = data.get("digest") if isinstance(data, dict) else None
        if not isinstance(ref, str) or not _PINNED_RE.fullmatch(ref) or ".." in ref:
            raise ConfigError(f"{source}: a 'requires' entry must name a pinned version such as "
                              f"{{\"ref\": \"shared@1\", \"digest\": \"<sha256>\"}}, got {data!r}")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise ConfigError(f"{source}: requires {ref}: 'digest' must be a sha256 (64 hex digits), got {digest!r}")
        return cls(ref, digest)


@dataclasses.dataclass(frozen=True)
class Metadata:
    """The contents of ``adapterhub.json``.

    ``parent`` is the adapter this one continued: a registry reference (``task@N``), or the
    directory it was continued from; only references can be published (the registry checks).
    """

    method: str
    base_fingerprint: str
    base_name: str = ""
    method_config: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    parent: str | None = None
    requires: tuple[Requirement, ...] = ()
    """The adapters it was trained on top of, applied below it wherever it is served (empty for most)."""

    @classmethod
    def from_dict(cls, data: object, *, source: str = METADATA_FILE) -> "Metadata":
        """Validated fields of a parsed ``adapterhub.json``; ConfigError naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        method = data.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError(f"{source}: 'method' must be a non-empty string such as \"lora\", got {method!r}")
        base = data.get("base")
        if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str) or not base["fingerprint"]:
            raise ConfigError(
                f"{source}: 'base' must be an object with a 'fingerprint' string "
                f"(from adapterhub.base.fingerprint(base_dir)), got {base!r}"
            )
        base_name = base.get("name") or ""
        if not isinstance(base_name, str):
            raise ConfigError(f"{source}: 'base.name' must be a string, got {base_name!r}")
        fields = {}
        for key in ("method_config", "training", "metrics"):
            value = data.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key!r} must be a JSON object, got {type(value).__name__}")
            fields[key] = value
        parent = data.get("parent")
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise ConfigError(f"{source}: 'parent' must be a reference such as \"task@3\" or null, got {parent!r}")
        requires = data.get("requires") or []
        if not isinstance(requires, list):
            raise ConfigError(f"{source}: 'requires' must be a list of {{ref, digest}} objects, got {requires!r}")
        return cls(method=method, base_fingerprint=base["fingerprint"], base_name=base_name, parent=parent,
                   requires=tuple(Requirement.from_dict(r, source=source) for r in requires), **fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": self.method_config,
            "base": {"name": self.base_name, "fingerprint": self.base_fingerprint},
            "training": self.training,
            "metrics": self.metrics,
            "parent": self.parent,
            # only when there is one: the adapterhub.json of every other version stays byte for byte as it was
            **({"requires": [r.to_dict() for r in self.requires]} if self.requires else {}),
        }

    def to_json(self) -> str:
        """The file's text: deterministic (the registry verifies the copies it writes byte for byte)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def read_metadata(directory: str | Path, *, required: bool = True) -> Metadata | None:
    """The validated ``adapterhub.json`` of ``directory``; when it has none, ConfigError (or None
    unless ``required``)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        if not required:
            return None
        raise ConfigError(
            f"{directory} has no {METADATA_FILE} (method, base fingerprint, ...); a plain PEFT directory is "
            "published with import (adapterhub registry import DIR --task T --base BASE_DIR)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return Metadata.from_dict(data, source=str(path))


def write_metadata(directory: str | Path, metadata: Metadata) -> None:
    """Write ``adapterhub.json`` into ``directory`` (whole or not at all)."""
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(".json.incomplete")
    tmp.write_text(metadata.to_json())
    tmp.replace(path)


def peft_method(config: Mapping[str, Any], formats: Mapping[tuple[str, str | None], str]) -> str | None:
    """The method, under ``formats``, of a plain PEFT adapter with this ``adapter_config.json``: the
    one whose variant flag is set in it, else the plain one of its ``peft_type``; None if none."""
    peft_type = str(config.get("peft_type") or "").upper()
    plain = None
    for (ptype, variant), name in formats.items():
        if ptype == peft_type and variant is None:
            plain = plain or name
        elif ptype == peft_type and config.get(variant):
            return name
    return plain


def check_base(described: Any, fingerprint: str, *, where: str | None = None, base_name: str = "",
               allow_mismatch: bool = False, advice: str | None = None) -> bool:
    """Refuse to put an adapter on a base it was not trained on; True when the bases match.

    ``described`` is anything with ``base_fingerprint`` and ``base_name``: a :class:`Metadata`, a
    registry ``Manifest``, the server's ``AdapterVersion``; ``where`` names the adapter in the
    message (default: its ``ref``), ``base_name`` the base it would go on. BaseMismatch names both
    fingerprints and says what to do (``advice``). ``allow_mismatch`` is for deliberate experiments
    (e.g. a fine-tuned variant of the same base): the mismatch is logged as a warning instead, and
    False returned. An adapter that names no base fingerprint cannot be checked: False.
    """
    trained = described.base_fingerprint
    if trained == fingerprint:
        return True
    if not trained:
        return False
    where = where or getattr(described, "ref", "")
    message = (f"{f'adapter {where}' if where else 'the adapter'} was trained on base "
               f"{described.base_name or 'unnamed'} ({trained}), not on {base_name or 'the loaded base'} ({fingerprint})")
    if allow_mismatch:
        log.warning("%s; loading anyway because the mismatch is allowed", message)
        return False
    raise BaseMismatch(f"{message}; " + (advice or "load it on the base it was trained on, or allow the mismatch "
                                                    "(--allow-base-mismatch, allow_mismatch=True) to override"))
