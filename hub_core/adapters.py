"""Adapter directories: a method's own files plus ``adapterhub.json``, our metadata.

``adapterhub.json`` (its fields and checks: :mod:`adapterhub.metadata`) records which method wrote
the adapter, its config, the base-model fingerprint it was trained on and how it was trained. PEFT
ignores the extra file, so a directory stays loadable by plain ``PeftModel.from_pretrained``.
Directories without it (plain PEFT adapters) are recognised by ``adapter_config.json``'s ``peft_type``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapterhub.registry import open_registry

from .adapter_files import PICKLE_SUFFIXES  # one list for the store and the loader
from .errors import ConfigError, IntegrityError, NotFound, PluginError
from .manager import PluginManager, get_manager
from .metadata import METADATA_FILE, Metadata, check_base, read_metadata, write_metadata
from .method import Method

PEFT_CONFIG = "adapter_config.json"


def adapter_metadata(directory: str | Path) -> Metadata | None:
    """The ``adapterhub.json`` of an adapter directory; None for a plain PEFT adapter (only
    ``adapter_config.json``). Pickle-format files are refused."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFound(f"adapter directory {directory} does not exist")
    refuse_pickles(directory)
    meta = read_metadata(directory, required=False)
    if meta is None and not (directory / PEFT_CONFIG).is_file():
        raise NotFound(f"{directory} is not an adapter directory: it has neither {METADATA_FILE} nor {PEFT_CONFIG}")
    return meta


def refuse_pickles(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            raise IntegrityError(
                f"{path} is a pickle-format file; adapterhub loads safetensors only (pickles can run code). "
                "Convert it with safetensors and remove it"
            )


def method_for_directory(directory: str | Path, manager: PluginManager | None = None,
                         meta: Metadata | None = None) -> Method:
    """The method that wrote the adapter: ``adapterhub.json``'s, else the one of its PEFT type."""
    manager = manager or get_manager()
    meta = meta or adapter_metadata(directory)
    if meta is not None:
        return manager.get_method(meta.method)
    cfg = json.loads((Path(directory) / PEFT_CONFIG).read_text())
    method = manager.method_for_peft_config(cfg)
    if method is None:
        raise PluginError(f"no installed method handles PEFT adapters of type {cfg.get('peft_type')!r} in {directory}")
    return method


def save_adapter(
    method: Method,
    model: Any,
    config: Any,
    directory: str | Path,
    *,
    base: dict[str, Any],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parent: str | None = None,
    requires: tuple[Any, ...] = (),
) -> Path:
    """Save the adapter with the method, then write our metadata beside it (``requires``: the
    :class:`~adapterhub.metadata.Requirement` of each version it was trained on top of)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method.save(model, directory)
    write_metadata(directory, Metadata(
        method=method.name,
        method_config=config.to_dict() if hasattr(config, "to_dict") else dict(config),
        base_name=base.get("name") or "",
        base_fingerprint=base.get("fingerprint"),
        training=training or {},
        metrics=metrics or {},
        parent=parent,
        requires=tuple(requires),
    ))
    return directory


def load_adapter(
    model: Any,
    directory: str | Path,
    *,
    base_fingerprint: str | None = None,
    allow_base_mismatch: bool = False,
    trainable: bool = False,
    manager: PluginManager | None = None,
) -> tuple[Method, Any]:
    """Attach the adapter in ``directory`` to ``model`` with the method that wrote it."""
    meta = adapter_metadata(directory)
    if base_fingerprint and meta is not None:
        check_base(meta, base_fingerprint, where=str(directory), allow_mismatch=allow_base_mismatch)
    method = method_for_directory(directory, manager, meta)
    return method, method.load(model, directory, trainable=trainable)


def parse_set_values(pairs: list[str], flag: str = "--set") -> dict[str, str]:
    """``["r=16", "alpha=32"]`` -> ``{"r": "16", "alpha": "32"}`` with a clear error."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE; e.g. {flag} r=16")
        values[key.strip()] = value
    return values


def resolve_adapter_dir(ref_or_dir: str | os.PathLike, registry: str | None = None) -> tuple[Path, str | None]:
    """A directory for a registry reference or a path; also the resolved ``task@N`` if any."""
    path = Path(ref_or_dir)
    if path.is_dir():
        return path, None

    store = open_registry(registry)
    manifest = store.manifest(str(ref_or_dir))
    return store.materialize(manifest), manifest.ref
