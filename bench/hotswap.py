"""(b) Hot-swap cost: loading an adapter into a live engine, and what it costs requests in flight.

1. Load time: ``engine.cache.load(ref)`` (registry resolve, snapshot, one read of every file, the
   manifest's per-chunk sha256s of those bytes checked by the hasher thread as the read brings
   them in and by the loading thread once it has built the method's serving form from them and
   written it into a stack slot) plus what is left for the first use to do (nothing, unless the
   slot was taken since), vs a raw ``safetensors.torch.load_file`` of the same
   ``adapter_model.safetensors`` (interleaved, medians). Target: <= 1.5x. The profile times the
   read, one sha256 of the file, the chunk check on two threads and the form one at a time.
2. In-flight latency: ``INFLIGHT`` rows stream tokens; meanwhile another thread loads ``SWAPS``
   new adapters into the cache, one at a time, a few steps apart. Per swap, the added latency is
   the largest inter-token gap of any in-flight row overlapping the swap minus the median step;
   target: at most one decode step. Quiet windows of the same length give the noise floor. Also reported: the same when requests using the new adapters join the batch
   (their prefill runs inside a step; that is continuous batching, not the swap).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import common

LOADS = 24
INFLIGHT = 16
SWAPS = 8


def _stream_times(seq, out: list[float]) -> None:
    for _ in seq.chunks():
        out.append(time.perf_counter())


def _inflight(engine, refs_for_swaps, join: bool) -> dict:
    """Swaps one at a time, ~5 decode steps apart; for each, the largest gap of any in-flight row
    that overlaps the swap, minus the median step. The same statistic over quiet windows of the
    same length (no swap) is the noise floor of this machine."""
    from adapterhub.serve.requests import GenerationRequest

    rows = [engine.submit(GenerationRequest.build(prompt=f"steady row {i} says", adapters=[(f"a{i % 4}@1", 1.0)],
                                                  max_new_tokens=200)) for i in range(INFLIGHT)]
    stamps = [[] for _ in rows]
    threads = [threading.Thread(target=_stream_times, args=(s, t)) for s, t in zip(rows, stamps)]
    for t in threads:
        t.start()
    while len(stamps[0]) < 16:
        time.sleep(0.01)
    step_guess = (stamps[0][-1] - stamps[0][4]) / (len(stamps[0]) - 5)
    swaps, quiet = [], []
    for ref in refs_for_swaps:
        time.sleep(5 * step_guess)
        start = time.perf_counter()
        engine.cache.load(ref)
        if join:
            engine.submit(GenerationRequest.build(prompt="a newcomer", adapters=[(ref, 1.0)], max_new_tokens=4)).result()
        end = time.perf_counter()
        swaps.append((start, end))
        time.sleep(5 * step_guess)
        quiet.append((time.perf_counter(), time.perf_counter() + (end - start)))
        time.sleep(end - start)
    last = time.perf_counter()
    for t in threads:
        t.join()
    gaps = [(a, b) for ts in stamps for a, b in zip(ts, ts[1:])]
    step = statistics.median([b - a for a, b in gaps if b < swaps[0][0] or a > last])

    def worst(window):
        return max((b - a for a, b in gaps if b >= window[0] and a <= window[1]), default=step) - step

    added = [worst(w) for w in swaps]
    noise = [worst(w) for w in quiet]
    return {"median_step_s": step, "added_s": added, "quiet_added_s": noise,
            "added_in_steps_max": max(added) / step, "added_in_steps_median": statistics.median(added) / step,
            "quiet_in_steps_max": max(noise) / step}


def main() -> dict:
    from safetensors.torch import load_file

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.malloc import limit_arenas

    limit_arenas()  # as `adapterhub serve` does, before any thread starts
    common.threads()
    base_dir = common.small_base()
    total = 4 + LOADS + 2 * SWAPS
    reg = common.registry(base_dir, total)
    engine = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=total + 4, max_batch=64)
    import hashlib

    from adapterhub.adapter_files import AdapterFiles
    from adapterhub.manager import get_manager

    from adapterhub.registry import hashing

    lora = get_manager().get_method("lora")
    hasher = ThreadPoolExecutor(1)
    load_s, raw_s, slot_s, read_s, sha_s, chunks_s, form_s = [], [], [], [], [], [], []
    for i in range(4, 4 + LOADS):
        ref = f"a{i}@1"
        path = engine.cache.source.materialize(engine.cache.resolve(ref)) / "adapter_model.safetensors"
        start = time.perf_counter()
        load_file(str(path))
        raw_s.append(time.perf_counter() - start)
        # profile, one piece at a time (the load runs the hash check and the form at the same time)
        files = AdapterFiles.from_directory(path.parent)
        start = time.perf_counter()
        data = files.read_bytes(path.name)
        files.read_bytes("adapter_config.json")
        read_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha_s.append(time.perf_counter() - start)
        entry = engine.cache.resolve(ref).manifest.files[path.name]
        if entry.chunks:
            buffer = bytearray(data)
            start = time.perf_counter()
            check = hashing.ChunksWhileReading(hasher, buffer, entry)
            check.advanced(memoryview(buffer), len(buffer))
            check.finish()
            assert check.matches()
            chunks_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        lora.serving_form(files, None)
        form_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        entry = engine.cache.load(ref)
        load_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.pool.lora.gather([[(entry.key, 1.0)]], engine.device)  # the load wrote the slot: a lookup
        slot_s.append(time.perf_counter() - start)
    hasher.shutdown()
    raw, load, slot = statistics.median(raw_s), statistics.median(load_s), statistics.median(slot_s)
    chunks = statistics.median(chunks_s) if chunks_s else float("nan")  # nan: manifests without chunk digests
    swap_only = _inflight(engine, [f"a{i}@1" for i in range(4 + LOADS, 4 + LOADS + SWAPS)], join=False)
    with_join = _inflight(engine, [f"a{i}@1" for i in range(4 + LOADS + SWAPS, total)], join=True)
    engine.stop(grace=1)
    results = {"load_median_s": load, "raw_safetensors_median_s": raw, "slot_write_median_s": slot,
               "profile_read_median_s": statistics.median(read_s), "profile_sha256_median_s": statistics.median(sha_s),
               "profile_chunk_check_two_threads_median_s": chunks,
               "profile_serving_form_median_s": statistics.median(form_s),
               "inflight_swap_only": swap_only, "inflight_swap_and_join": with_join}
    print(common.table(["measure", "value"], [
        ["registry load into engine (ms)", load * 1e3], ["raw safetensors read (ms)", raw * 1e3],
        ["load / raw", load / raw], ["stack slot write on first use (ms)", slot * 1e3],
        ["(load + slot write) / raw", (load + slot) / raw],
        ["  profile: read the files once (ms)", statistics.median(read_s) * 1e3],
        ["  profile: sha256 of those bytes, one thread (ms)", statistics.median(sha_s) * 1e3],
        ["  profile: their chunk sha256s, two threads (ms)", chunks * 1e3],
        ["  profile: LoRA form from those bytes (ms)", statistics.median(form_s) * 1e3],
        ["decode step, in flight (ms)", swap_only["median_step_s"] * 1e3],
        ["added in-flight latency per swap, worst (steps)", swap_only["added_in_steps_max"]],
        ["added in-flight latency per swap, median (steps)", swap_only["added_in_steps_median"]],
        ["same statistic, quiet windows (steps)", swap_only["quiet_in_steps_max"]],
        ["swap + a request joining with it, worst (steps)", with_join["added_in_steps_max"]],
    ]))
    results["targets"] = [
        common.verdict("(load + slot write) / raw safetensors read", (load + slot) / raw, "<=", 1.5),
        common.verdict("worst added in-flight latency per swap, in decode steps", swap_only["added_in_steps_max"], "<=", 1.0),
    ]
    common.save("hotswap", results)

    def draw(ax):
        names = ["raw read", "engine load", "load + slot"]
        ax.bar(names, [raw * 1e3, load * 1e3, (load + slot) * 1e3], color=["grey", "C0", "C1"])
        ax.set_ylabel("ms per adapter (median)")
        ax.set_title(f"(b) hot-swap: load vs raw safetensors read; in-flight +{swap_only['added_in_steps_max']:.2f} steps")

    common.plot("hotswap", draw)
    return results


if __name__ == "__main__":
    main()
