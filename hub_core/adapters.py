"""Adapter directories: a method's own files plus ``adapterhub.json``, our metadata.

``adapterhub.json`` records which method wrote the adapter, its config, the base-model fingerprint
it was trained on and how it was trained. PEFT ignores the extra file, so a directory stays
loadable by plain ``PeftModel.from_pretrained``. Directories without it (plain PEFT adapters) are
recognised by ``adapter_config.json``'s ``peft_type``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import BaseMismatch, ConfigError, IntegrityError, NotFound, PluginError
from .manager import PluginManager, get_manager
from .method import Method

log = logging.getLogger(__name__)

METADATA_FILE = "adapterhub.json"


def write_metadata(directory: str | Path, metadata: dict[str, Any]) -> None:
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(".json.incomplete")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Our metadata, or what can be inferred from a plain PEFT ``adapter_config.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFound(f"adapter directory {directory} does not exist")
    refuse_pickles(directory)
    meta_path = directory / METADATA_FILE
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{meta_path} is not valid JSON ({exc.msg}); re-export the adapter") from None
    peft_path = directory / "adapter_config.json"
    if peft_path.is_file():
        cfg = json.loads(peft_path.read_text())
        return {"method": None, "peft_type": cfg.get("peft_type"), "use_dora": cfg.get("use_dora", False)}
    raise NotFound(
        f"{directory} is not an adapter directory: it has neither {METADATA_FILE} nor adapter_config.json"
    )


def refuse_pickles(directory: Path) -> None:
    from adapterhub.registry.adapterdir import PICKLE_SUFFIXES  # one list for the store and the loader

    for path in directory.iterdir():
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            raise IntegrityError(
                f"{path} is a pickle-format file; adapterhub loads safetensors only (pickles can run code). "
                "Convert it with safetensors and remove it"
            )


def method_for_directory(directory: str | Path, manager: PluginManager | None = None) -> Method:
    manager = manager or get_manager()
    meta = read_metadata(directory)
    if meta.get("method"):
        return manager.get_method(meta["method"])
    peft_type = meta.get("peft_type")
    if meta.get("use_dora") and "dora" in manager.methods():
        return manager.get_method("dora")
    method = manager.method_for_peft_type(peft_type) if peft_type else None
    if method is None:
        raise PluginError(f"no installed method handles PEFT adapters of type {peft_type!r} in {directory}")
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
) -> Path:
    """Save the adapter with the method, then write our metadata beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method.save(model, directory)
    write_metadata(
        directory,
        {
            "method": method.name,
            "method_config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
            "base": {"name": base.get("name"), "fingerprint": base.get("fingerprint")},
            "training": training or {},
            "metrics": metrics or {},
            "parent": parent,
        },
    )
    return directory


def check_base(meta: dict[str, Any], fingerprint: str, *, where: str, allow_mismatch: bool = False) -> None:
    """Refuse an adapter trained on another base; names both fingerprints."""
    trained_on = (meta.get("base") or {}).get("fingerprint")
    if not trained_on or trained_on == fingerprint:
        return
    message = (
        f"adapter {where} was trained on base {meta['base'].get('name')} ({trained_on}), "
        f"but the loaded base has fingerprint {fingerprint}; load it on the base it was trained on"
    )
    if allow_mismatch:
        log.warning("loading anyway (base mismatch allowed): %s", message)
        return
    raise BaseMismatch(message + " (or pass --allow-base-mismatch to override)")


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
    meta = read_metadata(directory)
    if base_fingerprint:
        check_base(meta, base_fingerprint, where=str(directory), allow_mismatch=allow_base_mismatch)
    method = method_for_directory(directory, manager)
    return method, method.load(model, directory, trainable=trainable)


def parse_set_values(pairs: list[str]) -> dict[str, str]:
    """``["r=16", "alpha=32"]`` -> ``{"r": "16", "alpha": "32"}`` with a clear error."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE; e.g. --set r=16")
        values[key.strip()] = value
    return values
