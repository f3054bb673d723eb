"""Adapter churn under load: 20 adapter versions, a cache of 4, 16 clients, loads/unloads/tag moves.

Ten tasks with two versions each (LoRA adapters whose B matrices are scaled copies of two trained
ones, written by the method's own save). Every greedy answer must equal the offline PEFT answer for
the version the response says its reference resolved to.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
from serve_helpers import OfflineLora, chat, health_status, memory_kb, running_server, scaled_copy, serving, train_lora

from adapterhub.serve.client import Client

TASKS = 10
CLIENTS = 16
REQUESTS = 1008  # 63 per client
PROMPTS = ["the good day", "a bad movie", "dark cold room"]
MAX_NEW = 4
CAPACITY = 4


def test_churn_under_load_is_exact_and_bounded(tmp_path, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    sources = [train_lora(tiny_base_dir, tiny_tokenizer, tmp_path, task, steps=6) for task in ("sentiment", "reverse")]
    store = open_registry(tmp_path / "registry")
    refs = []
    for i in range(TASKS * 2):
        task, factor = f"t{i % TASKS}", 0.6 + 0.15 * i
        out = scaled_copy(tiny_base_dir, sources[i % 2], tmp_path / f"scaled-{i}", factor)
        refs.append(store.publish(task, out).ref)
    for t in range(TASKS):
        store.set_tag(f"t{t}@1", "prod")
    dirs = {ref: store.materialize(ref) for ref in refs}
    offline = OfflineLora(tiny_base_dir, tiny_tokenizer, list(dirs.values()))
    expected = {(ref, p): offline.tokens(dirs[ref], chat(p), MAX_NEW) for ref in refs for p in PROMPTS}
    assert len({tuple(v) for v in expected.values()}) >= 4, "the copies should not all answer alike"
    del offline

    stop = threading.Event()
    churn_counts: Counter = Counter()
    peak = {"rss": memory_kb()["VmRSS"], "resident": 0}
    rss_start = peak["rss"]

    with running_server(tiny_base_dir, store.root, max_adapters=CAPACITY, max_new_tokens=MAX_NEW) as srv, \
            Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
        def churn():
            rng = random.Random(7)
            while not stop.is_set():
                op, ref = rng.choice(["load", "unload", "tag", "tag"]), rng.choice(refs)
                if op == "load":
                    client.load(ref)
                elif op == "unload":
                    client.unload(ref)
                else:
                    store.set_tag(ref, "prod")
                churn_counts[op] += 1
                peak["rss"] = max(peak["rss"], memory_kb()["VmRSS"])
                peak["resident"] = max(peak["resident"], len(client.list_adapters().adapters))
                stop.wait(0.01)

        def worker(seed):
            rng = random.Random(seed)
            outcomes = Counter()
            for _ in range(REQUESTS // CLIENTS):
                t, prompt = rng.randrange(TASKS), rng.choice(PROMPTS)
                ref = rng.choice([f"t{t}@1", f"t{t}@2", f"t{t}@prod", f"t{t}"])
                try:
                    response = client.generate(messages=chat(prompt), adapters=[ref], max_new_tokens=MAX_NEW)
                except grpc.RpcError as exc:
                    outcomes[f"error {exc.code().name}: {exc.details()[:80]}"] += 1
                    continue
                resolved = response.adapters[0].resolved
                ok = list(response.token_ids) == expected[(resolved, prompt)]
                outcomes["exact" if ok else f"MISMATCH {ref}->{resolved} {prompt}"] += 1
            return outcomes

        churner = threading.Thread(target=churn)
        start = time.monotonic()
        churner.start()
        try:
            with ThreadPoolExecutor(CLIENTS) as pool:
                results = list(pool.map(worker, range(CLIENTS)))
        finally:
            stop.set()
            churner.join(60)
        elapsed = time.monotonic() - start
        assert health_status(client.channel) == serving()
        resident_end = len(client.list_adapters().adapters)

    totals = sum(results, Counter())
    hwm = memory_kb()["VmHWM"]
    print(f"churn: {sum(totals.values())} requests from {CLIENTS} clients in {elapsed:.1f}s; outcomes {dict(totals)}; "
          f"admin/tag ops {dict(churn_counts)}; resident adapters peak {peak['resident']} (capacity {CAPACITY}), "
          f"end {resident_end}; RSS start {rss_start // 1024} MiB, peak {peak['rss'] // 1024} MiB, VmHWM {hwm // 1024} MiB")
    assert totals["exact"] == (REQUESTS // CLIENTS) * CLIENTS, {k: v for k, v in totals.items() if k != "exact"}
    assert sum(churn_counts.values()) >= 20 and churn_counts["tag"] > 0 and churn_counts["unload"] > 0
    assert resident_end <= CAPACITY and peak["resident"] <= CAPACITY + CLIENTS
    assert peak["rss"] - rss_start < 1024 * 1024, "resident memory grew by more than 1 GiB under churn"
