"""SIGKILL during publish, tag, rm and gc: the registry always verifies and no reported version is lost.

Each child (numpy + adapterhub.registry only, no torch) runs a random mix of operations on one
registry and prints a line before each operation and one after it returns. The parent kills it at
a random moment and then checks: ``verify`` finds nothing, every version the child reported as
published (and did not start removing) materializes with the right bytes, and tags point at
existing versions.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from adapterhub.registry import FileStore

HERE = Path(__file__).parent
RUNS = 60

CHILD = r"""
import random, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from registry_helpers import make_adapter
from adapterhub.registry import FileStore
registry, seed = Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
store = FileStore(registry)
print("ready", flush=True)
i = 0
while True:
    op = rng.choice(["publish", "publish", "publish", "tag", "rm", "gc"])
    versions = store.list_versions("task")
    if op == "publish":
        print("begin publish", flush=True)
        adapter = make_adapter(registry.parent / f"src-{seed}-{i}", seed=seed * 1000 + i, size=rng.choice([64, 1024]))
        m = store.publish("task", adapter)
        print(f"published {m.ref} {m.files['adapter_model.safetensors'].sha256}", flush=True)
    elif op == "tag" and versions:
        v = rng.choice(versions)
        print(f"begin tag task@{v}", flush=True)
        store.set_tag(f"task@{v}", rng.choice(["prod", "canary"]))
        print("tagged", flush=True)
    elif op == "rm" and len(versions) > 2:
        v = rng.choice(versions)
        print(f"begin rm task@{v}", flush=True)
        store.remove_version(f"task@{v}", force=True)
        print("removed", flush=True)
    elif op == "gc":
        print("begin gc", flush=True)
        store.gc()
        print("collected", flush=True)
    i += 1
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_during_publish_tag_rm_gc_loses_nothing(tmp_path):
    registry = tmp_path / "registry"
    store = FileStore(registry)
    rng = random.Random(4321)
    published: dict[str, str] = {}  # ref -> sha256 of its weights, as reported by the child
    removing: set[str] = set()
    killed_in: Counter = Counter()
    start = time.monotonic()
    for run in range(RUNS):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(HERE), str(registry), str(run)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.stdout.read(), proc.stderr.read()  # not communicate(): it skips the readline buffer
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        last_begin = "idle"
        for line in out.splitlines():
            word, _, rest = line.partition(" ")
            if word == "published":
                ref, sha = rest.split()
                published[ref] = sha
            elif word == "begin":
                last_begin = rest.split()[0]
                if rest.startswith("rm "):
                    removing.add(rest.split()[1])
            if word in ("published", "tagged", "removed", "collected"):
                last_begin = "idle"
        killed_in[last_begin] += 1

        problems = store.verify()
        assert problems == [], f"run {run} (killed in {last_begin}): {[str(p) for p in problems]}"
        for ref, sha in published.items():
            if ref in removing:
                continue
            snapshot = store.materialize(ref)
            assert _sha(snapshot / "adapter_model.safetensors") == sha, f"run {run}: {ref} changed"
        versions = set(store.list_versions("task"))
        assert {f"task@{v}" for v in versions} >= set(published) - removing
        assert set(store.tags("task").values()) <= versions
    elapsed = time.monotonic() - start
    kept = len(set(published) - removing)
    print(f"{RUNS} SIGKILLs in {elapsed:.1f}s; killed during: {dict(killed_in)}; "
          f"{len(published)} versions reported published, {len(removing & set(published))} removed, {kept} checked")
    assert sum(killed_in[op] for op in ("publish", "tag", "rm", "gc")) >= RUNS // 3, killed_in
    assert killed_in["publish"] > 0 and len(published) >= 10
