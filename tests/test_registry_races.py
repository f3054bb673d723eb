"""Real processes racing on one registry: publishers, tag movers, a remover and gc at once, on the
directory store and on file:// (obstore's LocalStore: create-only links, the CAS file lock). Then
the registry must be whole: every publish present once under a number of its own (or removed),
numbers never reused, every tag on a live version, no blob missing."""

from __future__ import annotations

import multiprocessing
import queue
import time

import pytest
import registry_race_workers as workers

from adapterhub.registry import open_registry

PUBLISHERS, PUBLISHES, CONTENTS = 3, 25, 10
MOVERS, MOVES = 2, 20


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_publishers_tag_movers_remover_and_gc_racing(tmp_path, kind):
    url = str(tmp_path / "registry") if kind == "dir" else (tmp_path / "registry").as_uri()
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    go, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    finite = [ctx.Process(target=workers.publisher, args=(url, cache, str(tmp_path / "work"), w, PUBLISHES, CONTENTS,
                                                          go, results)) for w in range(PUBLISHERS)]
    finite += [ctx.Process(target=workers.tag_mover, args=(url, cache, m, MOVES, go, results)) for m in range(MOVERS)]
    endless = [ctx.Process(target=workers.remover, args=(url, cache, 2, go, stop, results)),
               ctx.Process(target=workers.collector, args=(url, cache, go, stop, results))]
    for p in finite + endless:
        p.start()
    go.set()
    reports = {}
    try:
        while len(reports) < len(finite):
            name, report = results.get(timeout=240)
            reports[name] = report
        # the remover and gc go on until the remover is down to its last versions: then gc surely meets
        # blobs no manifest names (whether it met some while publishers ran is up to the scheduler)
        watcher, deadline = open_registry(url, cache_dir=cache), time.monotonic() + 60
        while len(watcher.list_versions(workers.TASK)) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        while len(reports) < len(finite) + len(endless):
            name, report = results.get(timeout=120)
            reports[name] = report
    except queue.Empty:
        pytest.fail(f"a racing process hung; reports so far: {sorted(reports)}")
    finally:
        stop.set()
        for p in finite + endless:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {name: r["error"] for name, r in reports.items() if "error" in r}
    assert not errors, "\n".join(f"{name}:\n{text}" for name, text in errors.items())

    published = {(w, i): v for w in range(PUBLISHERS) for i, v in reports[f"publisher-{w}"]["published"].items()}
    numbers = list(published.values())
    assert len(numbers) == PUBLISHERS * PUBLISHES and len(set(numbers)) == len(numbers), "a number was given twice"
    removed = reports["remover"]["removed"]
    assert len(set(removed)) == len(removed) and set(removed) <= set(numbers)
    assert removed, "the remover never ran: the race did not exercise rm and gc"
    assert sum(r["moves"] for n, r in reports.items() if n.startswith("mover")) == MOVERS * MOVES

    store = open_registry(url, cache_dir=cache)
    assert store.verify() == [], "the registry is damaged after the race"
    live = store.list_versions(workers.TASK)
    assert live == sorted(set(numbers) - set(removed)), "a version was lost, or a removed one came back"
    for version in live:  # each live version is the publish that was told its number
        extra = store.get_manifest(workers.TASK, version).extra
        assert published[extra["writer"], extra["i"]] == version
        assert store.materialize(f"{workers.TASK}@{version}").is_dir()
    assert set(store.tags(workers.TASK).values()) <= set(live)
    assert reports["gc"]["blobs_removed"] > 0, "gc never freed a blob: the race did not exercise it"
    store.gc()  # a quiet gc frees the removed versions' blobs and nothing a live one needs
    assert store.verify() == []
    print(kind, {name: {k: v for k, v in r.items() if k != "published"} for name, r in sorted(reports.items())})
