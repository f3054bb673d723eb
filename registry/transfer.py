"""Moving adapters in and out of the registry as plain directories.

An export is what PEFT's ``from_pretrained`` expects (``adapter_config.json`` +
``adapter_model.safetensors`` ...) plus ``adapterhub.json`` (so the export can be published again
as-is) and ``manifest.json`` (the provenance it came from). The remote reuses both directions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from adapterhub.base import fingerprint  # light: torch is only imported for loading models
from adapterhub.errors import ConfigError, NotFound
from adapterhub.metadata import METADATA_FILE, Metadata

from . import fsutil
from .adapterdir import infer_method
from .manifest import Manifest
from .store import AdapterStore, RefLike


def export_dir(store: AdapterStore, ref: RefLike, out: str | os.PathLike) -> Path:
    """Write the version as a plain adapter directory at ``out`` (absent or empty); all or nothing.

    Files are copied, not linked: the export belongs to the user, and editing it must not
    change the registry.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; choose another --out or remove it")
    manifest = store.manifest(ref)
    snapshot = store.materialize(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = fsutil.temp_path(out)
    building.mkdir()
    try:
        for name in manifest.files:
            shutil.copyfile(snapshot / name, building / name)
        for name, data in manifest.described_files().items():
            (building / name).write_bytes(data)
        if out.exists():
            out.rmdir()
        os.rename(building, out)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return out


def import_dir(
    store: AdapterStore,
    task: str,
    adapter_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    base_fingerprint: str | None = None,
    base_name: str | None = None,
    method: str | None = None,
    parent: str | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Manifest:
    """Publish a directory that may lack ``adapterhub.json`` (a plain PEFT adapter).

    With ``adapterhub.json`` present it is an ordinary publish (an export re-imports as-is).
    Otherwise the metadata is built here: method from ``adapter_config.json`` (the format the
    methods declare: ``peft_type``, ``peft_variant``) unless ``method`` is given, and the base
    fingerprint computed from the ``base`` model directory (or given as ``base_fingerprint``). The
    user's directory is not modified.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise NotFound(f"adapter directory {adapter_dir} does not exist or is not a directory")
    if (adapter_dir / METADATA_FILE).is_file() and method is None and base is None and base_fingerprint is None:
        return store.publish(task, adapter_dir, parent=parent, extra=extra)
    if base_fingerprint is None:
        if base is None:
            raise ConfigError(
                f"importing {adapter_dir} needs the base model it was trained on: pass --base BASE_DIR "
                "(or a known fingerprint with --base-fingerprint sha256:...)"
            )

        base_fingerprint = fingerprint(base)
    if method is not None:
        method_config = _peft_config(adapter_dir)
    else:
        method, method_config = infer_method(adapter_dir)
    if base_name is None:
        base_name = str(method_config.get("base_model_name_or_path") or (Path(base).name if base else ""))
    metadata = Metadata(
        method=method,
        base_fingerprint=base_fingerprint,
        base_name=base_name,
        method_config=method_config,
        training=dict(training or {}),
        metrics=dict(metrics or {}),
        parent=None,
    )
    return store.publish(task, adapter_dir, parent=parent, extra=extra, metadata=metadata)


def _peft_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}
