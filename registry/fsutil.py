"""Crash-safe file writing: temp file in the same directory, then ``os.replace``.

The temp name is unique per process and call (``.<name>.<host>-<pid>-<random>.incomplete``, the
huggingface_hub ``.incomplete`` discipline), so two writers never share one, readers never match
it, and ``gc`` can tell a dead writer's leftovers from a live writer's work in progress.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

TEMP_SUFFIX = ".incomplete"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_CHUNK = 1 << 20
_READ_SLICE = 256 << 10  # read_exactly's pieces: a hasher can start on the first one early


def temp_path(final: Path) -> Path:
    """A sibling of ``final`` that only this process (and this call) will ever write."""
    return final.with_name(f".{final.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def is_stale_temp(path: Path, *, stale_after: float) -> bool:
    """True when the writer of a temp file is gone: its pid is dead on this host, or it is old.

    The age rule covers writers on other hosts sharing the registry over a network filesystem.
    """
    if not is_temp(path):
        return False
    try:
        host, pid, _ = path.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[1].split("-")
        pid_number = int(pid)
    except ValueError:
        host, pid_number = "", 0
    if host == _HOST and pid_number > 0 and not _pid_alive(pid_number):
        return True
    try:
        return time.time() - path.lstat().st_mtime > stale_after
    except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(final: Path, data: bytes, *, fsync: bool = True) -> None:
    """Publish ``data`` at ``final`` all at once: readers see the old file or the new, never half."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def copy_hashing(src: Path, dst: Path, digests: Any, *, max_bytes: int | None, fsync: bool,
                 on_too_big: Callable[[int], Exception]) -> int:
    """Copy ``src`` to a new file ``dst`` while ``digests.update`` hashes it (one read); returns the size.

    Hashing what was copied, not what was there before, means a file that changes while we copy
    cannot end up stored under another file's hash.
    """
    size = 0
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            while chunk := fin.read(_CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise on_too_big(size)
                digests.update(chunk)
                fout.write(chunk)
            fout.flush()
            if fsync:
                os.fsync(fout.fileno())
    except BaseException:
        _unlink_quietly(dst)
        raise
    return size


def sha256_file(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


def hash_file(path: Path, digests: Any) -> Any:
    """``digests.update`` with every byte of the file, in pieces; returns ``digests``."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digests.update(chunk)
    return digests


def read_exactly(path: Path, size: int, progress: Callable[[memoryview, int], None] | None = None, *,
                 into: bytearray | None = None) -> bytearray | None:
    """The file's bytes when it holds exactly ``size`` of them, else None (never reads more).

    One writable ``bytearray`` (``into``, of ``size`` bytes, when given), read in slices;
    ``progress(view, end)`` hears each time more is in (``view[:end]``), so the server hashes what
    has been read while the rest comes in.
    """
    data = bytearray(size) if into is None else into
    view = memoryview(data)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            got = f.readinto(view[done:done + _READ_SLICE])
            if not got:
                return None
            done += got
            if progress is not None:
                progress(view, done)
        if f.read(1):
            return None
    return data


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra space, like the Hub cache's snapshot symlinks) or copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o444)


def remove_tree(path: Path) -> None:
    """Remove a directory so that it is never seen half-deleted: rename it away first."""
    doomed = temp_path(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
