"""The read cache: readers verify versions into a directory of their own and never write to the
registry; the cache is bounded (LRU) and shared safely by processes on one host."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from registry_helpers import make_adapter

from adapterhub.registry import ReadCache, open_registry
from adapterhub.registry.readcache import default_cache_dir


def _store(tmp_path, **cache):
    store = open_registry(tmp_path / "registry")
    store.cache = ReadCache(tmp_path / "cache", **cache)
    return store


def _entry_bytes(store, ref) -> int:
    path = store.cache.entry_path(store.manifest(ref))
    return sum(f.stat().st_size for f in path.iterdir())


def test_the_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ADAPTERHUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "adapterhub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "adapterhub"
    store = open_registry(tmp_path / "r", cache_dir=tmp_path / "flag", cache_max_bytes="2M")
    assert store.cache.root == tmp_path / "flag" and store.cache.max_bytes == 2 * 2**20


def test_least_recently_used_entries_go_first(tmp_path):
    store = _store(tmp_path)
    for seed in (1, 2, 3):
        store.publish("t", make_adapter(tmp_path / f"a{seed}", seed=seed))
    one = _entry_bytes(store, "t@1") if store.materialize("t@1") else 0
    store.cache = ReadCache(tmp_path / "cache", max_bytes=2 * one + one // 2, min_age=0)
    store.materialize("t@2")
    store.materialize("t@1")  # used after t@2: t@2 is now the least recently used
    os.utime(store.cache.entry_path(store.manifest("t@2")), (1, 1))  # and clearly older than t@1
    store.materialize("t@3")
    kept = {p.name for p in (store.cache.root / "versions").iterdir()}
    assert kept == {store.cache.entry_path(store.manifest(r)).name for r in ("t@1", "t@3")}
    assert store.cache.usage()["bytes"] <= store.cache.max_bytes
    assert store.materialize("t@2").is_dir()  # fetched again when asked for


def test_an_entry_used_in_the_last_minute_is_never_evicted(tmp_path, caplog):
    store = _store(tmp_path, max_bytes=1)  # smaller than any entry
    for seed in (1, 2, 3):
        store.publish("t", make_adapter(tmp_path / f"a{seed}", seed=seed))
    with caplog.at_level(logging.WARNING, logger="adapterhub.registry.readcache"):
        first, second = store.materialize("t@1"), store.materialize("t@2")
    assert first.is_dir() and second.is_dir(), "an entry used just now was evicted"
    assert "over its bound" in caplog.text
    store.cache.min_age = 0
    third = store.materialize("t@3")
    assert not first.exists() and not second.exists() and third.is_dir(), "only the entry being built stays"


def test_a_directory_handed_out_is_fetched_again_after_eviction(tmp_path):
    """The server keeps ``directory`` for a slow path that may read it much later."""
    store = _store(tmp_path, min_age=0)
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    read = store.read_version("t@1")
    read.check()
    shutil.rmtree(read.directory)  # as an eviction by another process would
    read.check_directory()
    assert sorted(os.listdir(read.directory)) == sorted([*store.manifest("t@1").files, "adapterhub.json",
                                                        "manifest.json"])


def _materialize_all(registry: str, cache: str, refs: list[str], rounds: int, results) -> None:
    import time

    try:
        store = open_registry(registry)
        # entries untouched for 1 s may go: the reads here take milliseconds, the rounds seconds
        store.cache = ReadCache(cache, max_bytes=int(os.environ["CACHE_BOUND"]), min_age=1.0)
        misses = 0
        for _ in range(rounds):
            for ref in refs:
                misses += not store.cache.entry_path(store.manifest(ref)).exists()
                read = store.read_version(ref)
                read.check()
                assert bytes(read.data["adapter_model.safetensors"]) == store.read_bytes(ref, "adapter_model.safetensors")
                time.sleep(0.15)
        results.put(misses)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(repr(exc))


def test_processes_share_one_small_cache(tmp_path, monkeypatch):
    """Three processes read twelve versions round and round through a cache that holds about two:
    every read is whole and verified while the others build and evict entries beside it."""
    store = _store(tmp_path)
    refs = [store.publish("t", make_adapter(tmp_path / f"a{s}", seed=s, size=2000)).ref for s in range(12)]
    monkeypatch.setenv("CACHE_BOUND", str(2 * _entry_bytes(store, refs[0]) if store.materialize(refs[0]) else 0))
    shutil.rmtree(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_materialize_all, args=(str(tmp_path / "registry"), str(tmp_path / "cache"), refs, 3,
                                                        results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sum(outcomes) > len(refs), "nothing was ever evicted: the bound was not exercised"
    leftovers = [p.name for p in (tmp_path / "cache" / "versions").iterdir() if p.name.endswith(".incomplete")]
    assert leftovers == []


_READER = textwrap.dedent("""
    import json, os, sys, tempfile
    from adapterhub.registry import export_dir, open_registry
    from adapterhub.cli import main
    registry, cache = sys.argv[1], sys.argv[2]
    store = open_registry(registry, cache_dir=cache)
    for task in store.list_tasks():
        for version in store.list_versions(task):
            read = store.read_version(f"{task}@{version}")
            read.check()
            read.check_directory()
            store.materialize(f"{task}@{version}")
            export_dir(store, f"{task}@{version}", tempfile.mkdtemp(dir=cache))
    for tag in store.tags("t"):
        store.materialize(f"t@{tag}")
    assert store.verify() == []
    sys.exit(main(["registry", "--registry", registry, "--cache-dir", cache, "verify"]))
""")


def test_a_read_only_registry_serves_every_version_to_another_user(tmp_path):
    """The registry belongs to someone else and nobody may write it: a reader (run as ``nobody``
    when these tests run as root, who would ignore the modes) loads every version through its own
    cache, and the registry is byte-for-byte and stat-for-stat as it was."""
    top = Path(tempfile.mkdtemp(prefix="adapterhub-ro-"))  # not under pytest's 0700 tmp dirs
    try:
        os.chmod(top, 0o755)
        registry = top / "registry"
        writer = open_registry(registry, cache_dir=tmp_path / "cache")
        for seed in (1, 2, 3):
            writer.publish("t", make_adapter(tmp_path / f"a{seed}", seed=seed))
        writer.publish("u", make_adapter(tmp_path / "b", seed=4))
        writer.set_tag("t@2", "prod")
        subprocess.run(["chmod", "-R", "a-w,a+rX", str(registry)], check=True)
        before = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_mode) for p in registry.rglob("*"))
        reader_cache = top / "reader-cache"
        reader_cache.mkdir()
        command = [sys.executable, "-c", _READER, str(registry), str(reader_cache)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop to an unprivileged reader")
            os.chown(reader_cache, 65534, 65534)
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "HOME": str(reader_cache)})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok: every stored file matches its hash" in done.stdout
        assert sorted((str(p), p.stat().st_mtime_ns, p.stat().st_mode) for p in registry.rglob("*")) == before
        assert len(list((reader_cache / "versions").iterdir())) == 4
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(top)], check=False)
        shutil.rmtree(top, ignore_errors=True)
