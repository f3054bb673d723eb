"""Never partial, never lost: real publisher processes, racing and SIGKILLed.

Publishers are ``tests/registry_helpers.py`` run as scripts (numpy + adapterhub.registry only,
no torch), so each start costs a fraction of a second on the 2 shared cores.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from registry_helpers import make_adapter

from adapterhub.registry import FileStore
from adapterhub.registry.fsutil import TEMP_SUFFIX

HELPER = Path(__file__).with_name("registry_helpers.py")


def _publisher(registry: Path, *, writer: int, count: int, size: int = 64, go: Path | None = None, kill: str = "none"):
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(registry), "task", str(writer), str(count), str(size), str(go or "-"), kill],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_every_visible_version_is_complete(store: FileStore) -> list[int]:
    versions = store.list_versions("task")
    assert versions == list(range(1, len(versions) + 1)), versions
    assert store.verify() == []
    for version in versions:
        snapshot = store.materialize(f"task@{version}")
        assert sorted(os.listdir(snapshot)) == [
            "adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "manifest.json"]
    return versions


def test_eight_processes_publishing_concurrently_lose_nothing(tmp_path):
    registry, go = tmp_path / "registry", tmp_path / "go"
    procs = [_publisher(registry, writer=w, count=10, go=go) for w in range(8)]
    for proc in procs:  # all imported and waiting: the publishes really overlap
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    refs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        refs += [line.split()[1] for line in out.splitlines()]

    store = FileStore(registry)
    assert sorted(refs) == sorted(f"task@{n}" for n in range(1, 81))  # 80 distinct versions returned
    assert store.list_versions("task") == list(range(1, 81))
    assert store.verify() == []
    seen = set()
    for version in range(1, 81):
        manifest = store.get_manifest("task", version)
        writer, i = manifest.extra["writer"], manifest.extra["i"]
        seen.add((writer, i))
        expected = make_adapter(tmp_path / "expected" / f"{writer}-{i}", seed=writer * 1000 + i)
        assert manifest.files["adapter_model.safetensors"].sha256 == _sha(expected / "adapter_model.safetensors")
    assert seen == {(w, i) for w in range(8) for i in range(10)}  # each publish is its own version


@pytest.mark.parametrize("point", ["replace", "fsync"])
def test_sigkill_at_each_write_point_leaves_no_partial_version(tmp_path, point):
    """Deterministic crash points: die just before the K-th write is synced / made visible.

    One publish of new content does 4 of each: blob, blob, manifest, last_version counter.
    """
    for k in range(1, 5):
        store = FileStore(tmp_path / f"registry-{k}")  # fresh each time, so no blob is reused
        proc = _publisher(store.root, writer=k, count=1, kill=f"{point}:{k}")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        versions = _assert_every_visible_version_is_complete(store)
        # the manifest is the 3rd write: before it nothing is visible, from then on all of it
        assert versions == ([1] if k == 4 else [])
        _assert_collected_clean(store)


def test_sigkill_at_random_points_never_leaves_a_partial_version(tmp_path):
    registry = tmp_path / "registry"
    store = FileStore(registry)
    rng = random.Random(1234)
    kills = 0
    for round_ in range(20):
        proc = _publisher(registry, writer=round_, count=0, size=4096)  # ~130 kB per publish
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.08))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += proc.returncode == -signal.SIGKILL
        _assert_every_visible_version_is_complete(store)
    assert kills == 20
    versions = store.list_versions("task")
    assert versions, "no publish finished in 20 rounds; the kill window is too short to mean anything"
    _assert_collected_clean(store)


def _assert_collected_clean(store: FileStore) -> None:
    """After the crashes: gc removes dead writers' leftovers, and the registry still verifies."""
    store.gc()
    leftovers = [p for p in store.root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert leftovers == []
    referenced = {e.sha256 for v in store.list_versions("task") for e in store.get_manifest("task", v).files.values()}
    blobs = store.root / "blobs"
    assert (set(os.listdir(blobs)) if blobs.is_dir() else set()) == referenced
    assert store.verify() == []
    # the lock was released by the kernel when the writer died: publishing still works
    assert store.publish("task", make_adapter(store.root.parent / "after", seed=99999)).version == max(
        store.list_versions("task"))
