"""Reading an adapter directory before it is published: what is stored, and what is refused.

All refusals happen here, before a single byte is written to the registry, so a refused publish
leaves nothing behind.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from adapterhub.adapter_files import PICKLE_SUFFIXES
from adapterhub.errors import ConfigError, IntegrityError, LimitExceeded, NotFound
from adapterhub.manager import get_manager
from adapterhub.metadata import BUILTIN_PEFT_FORMATS, peft_method

from .manifest import RESERVED_FILES
from .names import validate_file_name


def adapter_files(adapter_dir: Path, *, max_file_bytes: int | None) -> dict[str, Path]:
    """The files to store, by name. Hidden files and the metadata files are left out.

    Refuses pickle formats, subdirectories, unsafe names, oversized files and ``.safetensors``
    files that are not safetensors (a renamed pickle would otherwise slip through).
    """
    if not adapter_dir.is_dir():
        raise NotFound(f"adapter directory {adapter_dir} does not exist or is not a directory")
    files: dict[str, Path] = {}
    for path in sorted(adapter_dir.iterdir()):
        name = path.name
        if name.startswith(".") or name in RESERVED_FILES:
            continue  # .gitattributes, .cache/ from hub downloads; metadata goes into the manifest
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise IntegrityError(
                f"{path}: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) are refused because loading "
                "them can run code; save the adapter with safetensors (e.g. save_pretrained(..., "
                "safe_serialization=True)) and remove this file"
            )
        if path.is_dir():
            raise ConfigError(f"{path}: subdirectories are not supported in an adapter directory; keep files flat")
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        validate_file_name(name)
        size = path.stat().st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise LimitExceeded(
                f"{path} is {size} bytes, more than the registry's max_file_bytes={max_file_bytes}; "
                "raise the limit (--max-file-bytes) if this file is expected"
            )
        if name.endswith(".safetensors"):
            _check_safetensors_header(path, size)
        files[name] = path
    if not files:
        raise ConfigError(f"{adapter_dir} holds no adapter files (expected e.g. adapter_model.safetensors)")
    return files


def _check_safetensors_header(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        ok = 0 < length <= size - 8
        if ok:
            try:
                ok = isinstance(json.loads(f.read(length)), dict)
            except (ValueError, UnicodeDecodeError):
                ok = False
    if not ok:
        raise IntegrityError(f"{path} is not a valid safetensors file (bad header); refusing to store it")


def infer_method(adapter_dir: Path) -> tuple[str, dict]:
    """(method name, method config) of a plain PEFT directory, from ``adapter_config.json``."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir} has no adapter_config.json; pass the method explicitly (--method NAME)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    method = peft_method(config, BUILTIN_PEFT_FORMATS)
    if method is None:  # a format only a third-party plugin reads: ask the plugins (they may import torch)

        formats = get_manager().peft_formats()
        method = peft_method(config, formats)
        if method is None:
            raise ConfigError(
                f"{path}: cannot infer the method from peft_type={config.get('peft_type')!r} "
                f"(known: {', '.join(sorted({t for t, _ in formats}))}); pass --method NAME"
            )
    return method, config
