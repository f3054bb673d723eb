"""Chunked sha256 checks on a load: per-chunk ``hashlib.sha256`` against one whole-file hash (issue 21).

What is timed is what the server does to load a version (``serve/adapter_source.py``, then
``serve/cache.py``): ``AdapterSource.read`` (``store.read_version(manifest, hasher=...)``: each
file read once into a buffer while the hasher thread checks the manifest's 256 KiB chunk digests of
what has been read) and then ``check()`` (the loading thread takes the chunks the hasher has not
reached and waits for the rest). Two ways to check, the only thing that differs between them
(a third, a C verifier, was measured against these and removed: 1-3% faster was not worth a second
extension; that run is in this file's git history and ``registry/hashing.py``'s docstring):

- ``python``: ``registry/hashing.py``'s ``Verifier``, the same protocol in Python: one
  ``hashlib.sha256`` call per chunk over a memoryview slice (hashlib releases the GIL while it
  hashes, so the two threads overlap each other and the read);
- ``whole``: one sha256 of the file on the hasher thread (versions published without chunk digests).

Scenarios: ``read+check`` (the read and the check alone), ``read+form+check`` (the LoRA serving form
built from the read bytes in between, as the loading thread does before ``check()``), and ``check``
(the buffer already read: the hashing alone, on two threads). Adapters: the real rank-16 LoRA of
SmolLM2-135M on all 210 linear modules (19.6 MB, fp32; ``bench/common.py`` makes it) and a rank-64
one made from it (78 MB; each A and B repeated four times along the rank). Interleaved rounds (the
order of the ways rotates each round), files in the page cache as a server's recent ones are;
medians and per-round ratios. ``BENCH_CHUNK_ROUNDS`` (default 60) rounds, counting only quiet ones:
this is a two-core measurement, so a round in which other processes kept more than 0.15 of a core
busy (``/proc/stat`` less this process) is run again.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from . import common

ROUNDS = int(os.environ.get("BENCH_CHUNK_ROUNDS", "60"))
WARMUP = 3
QUIET_CORES = 0.15  # a round counts only if other processes used less than this many cores meanwhile
MAX_WAIT_S = float(os.environ.get("BENCH_CHUNK_MAX_WAIT_S", "600"))  # per cell, for enough quiet rounds
SCENARIOS = ("read+check", "read+form+check", "check")
WEIGHTS = "adapter_model.safetensors"


class Quiet:
    """How many cores other processes kept busy since it was made (``/proc/stat`` less this process)."""

    def __init__(self):
        self._start = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def others(self) -> float:
        wall, busy, own = self._start
        return max(0.0, (self._busy() - busy) - (self._own() - own)) / (time.perf_counter() - wall)


def adapters() -> dict[str, Path]:
    """{"r16": the real SmolLM2 rank-16 adapter, "r64": its rank-64 widening} (made once)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    which = common.SHAPES["smollm2"]
    r16 = which.home / "adapters" / "a0"
    if not (r16 / "adapterhub.json").is_file():
        common.lora_adapters(common.base_dir(which), 1, which)
    r64 = common.OUT / "chunk_hashing" / "r64"
    if not (r64 / "adapterhub.json").is_file():
        shutil.rmtree(r64, ignore_errors=True)
        r64.mkdir(parents=True)
        tensors = {}
        for name, value in load_file(str(r16 / WEIGHTS)).items():  # A: (r, in), B: (out, r)
            tensors[name] = np.ascontiguousarray(np.concatenate([value] * 4, axis=0 if "lora_A" in name else 1))
        save_file(tensors, str(r64 / WEIGHTS))
        config = json.loads((r16 / "adapter_config.json").read_text())
        config.update(r=64, lora_alpha=128.0)
        (r64 / "adapter_config.json").write_text(json.dumps(config, indent=2))
        meta = json.loads((r16 / "adapterhub.json").read_text())
        meta["method_config"].update(r=64, alpha=128.0)
        (r64 / "adapterhub.json").write_text(json.dumps(meta, indent=2))
    return {"r16": r16, "r64": r64}


class Counting:
    """A verifier that records how many chunks each thread hashed (diagnostic pass, not timed)."""

    tally: dict[str, int] = {}
    base = None

    def __init__(self, *args):
        self._v = Counting.base(*args)
        self.tally = Counting.tally  # this load's, whenever its threads return

    def advanced(self, end):
        self._v.advanced(end)

    def read_over(self):
        self._v.read_over()

    def run(self):
        n = self._v.run()
        who = "hasher" if threading.current_thread().name.startswith("adapterhub-sha256") else "loader"
        self.tally[who] = self.tally.get(who, 0) + n
        return n

    def wait(self):
        return self._v.wait()


def main() -> dict:
    from adapterhub.manager import get_manager
    from adapterhub.registry import hashing, open_registry
    from adapterhub.serve.adapter_source import AdapterSource

    common.threads()
    dirs = adapters()
    registry = common.OUT / "chunk_hashing" / "registry"
    store = open_registry(registry)
    for task, directory in dirs.items():
        if task not in store.list_tasks():
            store.publish(task, directory)
    source = AdapterSource(registry)
    lora = get_manager().get_method("lora")
    python_verifier = hashing.Verifier
    original = hashing.verify_while_reading
    modes = {"python": python_verifier, "whole": None}

    def use(mode):
        """Point the registry's read path at one way of checking."""
        if modes[mode] is None:
            hashing.verify_while_reading = (
                lambda executor, entry, buffer: hashing.ShaWhileReading(executor, entry.size, expected=entry.sha256))
        else:
            hashing.verify_while_reading = original
            hashing.Verifier = modes[mode]

    def load(version, scenario: str) -> float:
        if scenario == "check":  # the hashing alone: a buffer already read, checked on two threads
            entry = version.manifest.files[WEIGHTS]
            buffer = bytearray((source.materialize(version) / WEIGHTS).read_bytes())
            start = time.perf_counter()
            check = hashing.verify_while_reading(source._hasher, entry, buffer)
            check.advanced(memoryview(buffer), len(buffer))
            check.finish()
            assert check.matches()
            return time.perf_counter() - start
        start = time.perf_counter()
        files = source.read(version)
        if scenario == "read+form+check":
            form = lora.serving_form(files, None)
            assert form is not None
        files.check()
        return time.perf_counter() - start

    results: dict = {"rounds": ROUNDS, "modes": list(modes), "scenarios": {}, "sizes": {}}
    try:
        for task in dirs:
            version = source.resolve(f"{task}@1")
            entry = version.manifest.files[WEIGHTS]
            results["sizes"][task] = {"bytes": entry.size, "chunk_size": entry.chunk_size, "chunks": len(entry.chunks)}
            for scenario in SCENARIOS:
                times: dict[str, list[float]] = {m: [] for m in modes}
                order, tried, others = list(modes), 0, []
                deadline = time.monotonic() + MAX_WAIT_S
                while len(times[order[0]]) < ROUNDS and (time.monotonic() < deadline or len(times[order[0]]) < 5):
                    r, tried = tried, tried + 1
                    quiet = Quiet()
                    took = {}
                    for mode in order[r % len(order):] + order[:r % len(order)]:
                        use(mode)
                        took[mode] = load(version, scenario)
                    busy = quiet.others()
                    if r < WARMUP:
                        continue
                    others.append(busy)
                    if busy > QUIET_CORES:  # another job used the cores this round: not a 2-core measurement
                        time.sleep(0.2)
                        continue
                    for mode, t in took.items():
                        times[mode].append(t)
                shares = {}
                for mode in modes:  # who hashed the chunks (one untimed load each)
                    if modes[mode] is None:
                        continue
                    Counting.base, Counting.tally = modes[mode], {}
                    use(mode)
                    hashing.Verifier = Counting
                    load(version, scenario)
                    source._hasher.submit(lambda: None).result()  # its run() has returned too
                    shares[mode] = dict(Counting.tally)
                med = {m: statistics.median(t) for m, t in times.items()}
                cell = {"median_ms": {m: v * 1e3 for m, v in med.items()},
                        "quiet_rounds": len(times[order[0]]), "rounds_tried": tried - WARMUP,
                        "others_cores_per_round": others,
                        "times_ms": {m: [x * 1e3 for x in t] for m, t in times.items()},
                        "chunks_hashed_by": shares}
                cell["whole_over_python"] = med["whole"] / med["python"]
                results["scenarios"].setdefault(task, {})[scenario] = cell
                print(f"{task} {entry.size / 1e6:.1f} MB {scenario:>16}: "
                      + "  ".join(f"{m} {v * 1e3:.2f} ms" for m, v in med.items())
                      + f"  whole/python {cell['whole_over_python']:.3f}  chunks by {shares}"
                      + f"  ({cell['quiet_rounds']} quiet rounds of {cell['rounds_tried']})", flush=True)
    finally:
        hashing.Verifier, hashing.verify_while_reading = python_verifier, original
    rows = []
    for task, scenarios in results["scenarios"].items():
        for scenario, cell in scenarios.items():
            rows.append([f"{results['sizes'][task]['bytes'] / 1e6:.1f} MB", scenario,
                         *(cell["median_ms"][m] for m in modes), cell["whole_over_python"]])
    print(common.table(["file", "what", *(f"{m} (ms)" for m in modes), "whole / python"], rows))
    common.save("chunk_hashing", results)
    return results


if __name__ == "__main__":
    main()
