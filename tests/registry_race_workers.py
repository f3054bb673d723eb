"""Processes that race on one registry (spawned by test_registry_races.py): publishers, tag movers,
a remover and a garbage collector. Each reports what it did on a queue; numpy only, no torch."""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path

from registry_helpers import make_adapter

TASK = "race"
TAGS = ("prod", "canary")


def _open(url: str, cache: str):
    from adapterhub.registry import open_registry

    return open_registry(url, cache_dir=cache)


def _run(name: str, results, body) -> None:
    try:
        results.put((name, body()))
    except BaseException:  # noqa: BLE001 - the parent asserts on it, with the traceback
        results.put((name, {"error": traceback.format_exc()}))


def publisher(url: str, cache: str, work: str, writer: int, count: int, contents: int, go, results) -> None:
    """Publishes ``count`` versions drawn from ``contents`` distinct adapters (shared with the other
    publishers, so a blob is often unreferenced after a removal just as someone publishes it again)."""
    def body():
        store = _open(url, cache)
        dirs = [make_adapter(Path(work) / f"w{writer}" / str(k), seed=k) for k in range(contents)]
        go.wait()
        published = {}
        for i in range(count):
            manifest = store.publish(TASK, dirs[(writer * 3 + i) % contents], extra={"writer": writer, "i": i})
            published[i] = manifest.version
        return {"published": published}

    _run(f"publisher-{writer}", results, body)


def tag_mover(url: str, cache: str, mover: int, moves: int, go, results) -> None:
    def body():
        from adapterhub.errors import NotFound

        store = _open(url, cache)
        rng = random.Random(mover)
        go.wait()
        done = missed = 0
        deadline = time.monotonic() + 120
        while done < moves:
            versions = store.list_versions(TASK)
            if not versions:
                if time.monotonic() > deadline:
                    raise TimeoutError("no version to tag was published in 120 s")
                time.sleep(0.01)
                continue
            try:
                store.set_tag(f"{TASK}@{rng.choice(versions)}", rng.choice(TAGS))
                done += 1
            except NotFound:  # removed between the listing and the move
                missed += 1
        return {"moves": done, "missed": missed}

    _run(f"mover-{mover}", results, body)


def remover(url: str, cache: str, keep: int, go, stop, results) -> None:
    """Removes the oldest version (tagged or not) while more than ``keep`` exist."""
    def body():
        from adapterhub.errors import NotFound

        store = _open(url, cache)
        go.wait()
        removed = []
        while not stop.is_set():
            versions = store.list_versions(TASK)
            if len(versions) <= keep:
                time.sleep(0.01)
                continue
            try:
                removed.append(store.remove_version(f"{TASK}@{versions[0]}", force=True).version)
            except NotFound:
                pass
        return {"removed": removed}

    _run("remover", results, body)


def collector(url: str, cache: str, go, stop, results) -> None:
    def body():
        store = _open(url, cache)
        go.wait()
        runs, freed = 0, 0
        while not stop.is_set():
            freed += len(store.gc()["blobs_removed"])
            runs += 1
            time.sleep(0.002)
        return {"runs": runs, "blobs_removed": freed}

    _run("gc", results, body)
