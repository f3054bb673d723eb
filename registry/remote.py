"""The Hugging Face Hub as a remote: push an export, pull a snapshot and import it.

Kept deliberately thin: the export/import code does the work, huggingface_hub moves the bytes.
``huggingface_hub`` is imported only when a push or pull actually talks to the Hub. The ``api`` and
``download`` parameters exist so the code path can be exercised offline with stand-ins.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from adapterhub.adapter_files import PICKLE_SUFFIXES
from .manifest import Manifest
from .store import AdapterStore, RefLike
from .transfer import export_dir, import_dir


def stage_push(store: AdapterStore, ref: RefLike, directory: str | os.PathLike) -> list[str]:
    """Export ``ref`` into ``directory`` and return the repo paths a push uploads, sorted."""
    out = export_dir(store, ref, directory)
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def push(
    store: AdapterStore,
    ref: RefLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    api: Any = None,
) -> dict[str, Any]:
    """Upload the export of ``ref`` (adapter files + adapterhub.json + manifest.json) to a Hub repo."""
    manifest = store.manifest(ref)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="adapterhub-push-") as tmp:
        folder = Path(tmp) / "export"
        files = stage_push(store, manifest, folder)
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=f"adapterhub: {manifest.ref} ({manifest.method})",
        )
    return {"ref": manifest.ref, "repo": repo_id, "files": files, "commit": str(commit)}


def import_snapshot(store: AdapterStore, directory: str | os.PathLike, task: str, **import_options: Any) -> Manifest:
    """Publish a downloaded (or any local) adapter snapshot as the next version of ``task``."""
    return import_dir(store, task, directory, **import_options)


def pull(
    store: AdapterStore,
    repo_id: str,
    task: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    download: Callable[..., str] | None = None,
    **import_options: Any,
) -> Manifest:
    """Download a Hub adapter repo (or take a local directory path) and import it into ``task``.

    Pickle weights are never downloaded; a repo that only has those fails at import with a
    message saying safetensors are required.
    """
    if os.path.isdir(repo_id):
        return import_snapshot(store, repo_id, task, **import_options)
    if download is None:
        from huggingface_hub import snapshot_download as download
    snapshot = download(
        repo_id=repo_id,
        revision=revision,
        token=token,
        ignore_patterns=[f"*{suffix}" for suffix in PICKLE_SUFFIXES],
    )
    return import_snapshot(store, snapshot, task, **import_options)
