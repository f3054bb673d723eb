"""(k) Ray Serve with adapter-affinity routing: hit rate with multiplexing on vs off, and a killed replica.

A local Ray cluster on 127.0.0.1 (``num_cpus=2``), 2 replicas of the engine on the nf4 tiny base, 12
LoRA adapters (scaled copies of two trained ones, as ``tests/test_churn.py`` makes them: their
greedy answers have clear winners, so every answer can be held to the offline one), each replica
holding at most ``CAPACITY`` of them. ``REQUESTS`` requests through the ingress with the ``openai``
client, ``CLIENTS`` at a time, a seeded random adapter and prompt each, every ``STREAM_EVERY``-th one
streamed:

1. multiplexing on (fresh replicas): every answer against offline PEFT generation; the affinity hit
   rate from the replicas' own counters (a hit: every version the request pinned was resident in
   the replica's adapter cache when it arrived);
2. the same load with a replica SIGKILLed after ``KILL_AFTER`` answers: how many requests failed
   (a stream cut mid-answer ends with an error event; a request no byte of which was sent is sent
   again), that every other one answered as offline, and how long Ray took to start a replacement;
3. the same load as 1 on fresh replicas with multiplexing off (Ray's default routing).

Writes ``bench/results/ray_affinity.json``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import common

ADAPTERS = 12
CAPACITY = 8  # per replica: the 12 do not fit one, they fit two
REQUESTS = 400
CLIENTS = 8
STREAM_EVERY = 4
MAX_NEW = 8
KILL_AFTER = 100
PROMPTS = [("sentiment?", "the good day"), ("sentiment?", "a bad movie"), ("reverse:", "lamp"), ("reverse:", "stone")]


def _messages(prompt: tuple[str, str]) -> list[dict]:
    return [{"role": "user", "content": f"{prompt[0]}\n\n{prompt[1]}"}]


def world(work: Path) -> tuple[Path, Path, dict]:
    """The tiny base, a registry of ADAPTERS versions, and each (adapter, prompt)'s offline answer."""
    sys.path.insert(0, str(common.ROOT.parent / "tests"))  # the test suite's trained LoRAs and offline reference
    from serve_helpers import OfflineLora, scaled_copy, train_lora

    from adapterhub.base import init_base, load_tokenizer
    from adapterhub.registry import open_registry

    base = work / "tiny"
    if not (base / "config.json").is_file():
        init_base("tiny", base)
    tokenizer = load_tokenizer(base)
    sources = [train_lora(base, tokenizer, work, task, steps=6) for task in ("sentiment", "reverse")]
    store = open_registry(work / "registry")
    for i in range(ADAPTERS):
        if f"t{i}" not in store.list_tasks():
            store.publish(f"t{i}", scaled_copy(base, sources[i % 2], work / f"scaled-{i}", 0.6 + 0.15 * i))
    dirs = {f"t{i}": store.materialize(f"t{i}@1") for i in range(ADAPTERS)}
    offline = OfflineLora(base, tokenizer, list(dirs.values()))
    text = {(task, p): tokenizer.decode(offline.tokens(d, [("user", _messages(p)[0]["content"])], MAX_NEW),
                                        skip_special_tokens=True)
            for task, d in dirs.items() for p in PROMPTS}
    return base, work / "registry", text


def load(client, expected: dict, seed: int, on_answer=None) -> dict:
    """REQUESTS requests, CLIENTS at a time; each one's outcome."""
    import openai

    rng = random.Random(seed)
    jobs = [(i, f"t{rng.randrange(ADAPTERS)}", rng.choice(PROMPTS)) for i in range(REQUESTS)]

    def one(job):
        i, task, prompt = job
        stream = i % STREAM_EVERY == 0
        try:
            if stream:
                with client.chat.completions.with_streaming_response.create(
                        model=task, messages=_messages(prompt), max_tokens=MAX_NEW, temperature=0,
                        stream=True) as response:
                    replica = response.headers.get("x-adapterhub-replica")
                    text = "".join((c.choices[0].delta.content or "") if c.choices else "" for c in response.parse())
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model=task, messages=_messages(prompt), max_tokens=MAX_NEW, temperature=0)
                replica, text = raw.headers.get("x-adapterhub-replica"), raw.parse().choices[0].message.content
            outcome = {"ok": True, "equal": text == expected[(task, prompt)]}
        except openai.APIError as exc:
            replica, outcome = None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
        outcome.update(stream=stream, replica=replica)
        if on_answer is not None:
            on_answer(outcome)
        return outcome

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(one, jobs))
    return {"outcomes": outcomes, "seconds": time.perf_counter() - start}


def summary(run: dict, before: dict, after: dict) -> dict:
    """A load's outcomes, with the hits and misses the replicas counted meanwhile (ledger deltas)."""
    def counted(kind: str) -> int:
        return sum(r[kind] for r in after.values()) - sum(r[kind] for r in before.values())

    outcomes, hits, misses = run["outcomes"], counted("hits"), counted("misses")
    answered = [o for o in outcomes if o["ok"]]
    failed = [o for o in outcomes if not o["ok"]]
    return {"requests": len(outcomes), "answered": len(answered), "failed": len(failed),
            "failed_streams": sum(o["stream"] for o in failed), "failed_unary": sum(not o["stream"] for o in failed),
            "answers_equal_offline": sum(o["equal"] for o in answered), "hits": hits, "misses": misses,
            "hit_rate": hits / max(1, hits + misses), "seconds": run["seconds"],
            "requests_per_s": len(outcomes) / run["seconds"], "errors": sorted({o["error"] for o in failed})[:5]}


def main() -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import openai
    import ray
    from ray import serve

    from adapterhub.serve import ray_app
    from adapterhub.serve.server import ServerOptions

    work = common.OUT / "ray-affinity"
    work.mkdir(parents=True, exist_ok=True)
    base, registry, expected = world(work)
    print(f"{len(set(expected.values()))} distinct offline answers over {len(expected)} (adapter, prompt) pairs",
          flush=True)
    options = ServerOptions(base=str(base), registry=str(registry), quantize="nf4", max_adapters=CAPACITY,
                            max_new_tokens=64)
    port = common.free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    phases = {}
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        ray_app.deploy(options, host="127.0.0.1", port=port, replicas=2, timeout_s=120)
        before = ray_app.affinity_counts()
        phases["multiplexed"] = summary(load(client, expected, seed=1), before, ray_app.affinity_counts())
        print(f"multiplexed: {phases['multiplexed']}", flush=True)

        before = ray_app.affinity_counts()
        pids = {replica: c["pid"] for replica, c in before.items()}
        kill = {"done": 0, "at": None, "victim": None}
        lock = threading.Lock()

        def on_answer(outcome: dict) -> None:
            with lock:
                kill["done"] += 1
                if kill["at"] is None and kill["done"] >= KILL_AFTER and outcome["replica"] in pids:
                    kill["victim"], kill["at"] = outcome["replica"], time.monotonic()
                    os.kill(pids[outcome["replica"]], signal.SIGKILL)

        killed = summary(load(client, expected, seed=2, on_answer=on_answer), before, ray_app.affinity_counts())
        replaced = None
        while replaced is None and time.monotonic() - kill["at"] < 180:
            states = serve.status().applications[ray_app.APP].deployments["Replica"].replica_states
            if states.get("RUNNING") == 2 and set(ray_app.affinity_counts()) - set(pids):
                replaced = time.monotonic() - kill["at"]
            time.sleep(0.5)
        phases["replica_killed"] = {**killed, "killed_after_answers": KILL_AFTER, "replacement_running_s": replaced}
        print(f"replica killed: {phases['replica_killed']}", flush=True)

        ray_app.deploy(options, host="127.0.0.1", port=port, replicas=2, timeout_s=120, affinity=False)
        before = ray_app.affinity_counts()
        phases["random"] = summary(load(client, expected, seed=1), before, ray_app.affinity_counts())
        print(f"random: {phases['random']}", flush=True)
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [[name, p["requests"], p["answered"], p["failed"], p["answers_equal_offline"], p["hit_rate"],
             p["requests_per_s"]] for name, p in phases.items()]
    print(common.table(["routing", "requests", "answered", "failed", "equal offline", "hit rate", "req/s"], rows))
    targets = [
        common.verdict("answers equal to offline (all phases)", float(all(
            p["answers_equal_offline"] == p["answered"] for p in phases.values())), ">=", 1.0),
        common.verdict("hit rate: multiplexed - random", phases["multiplexed"]["hit_rate"] - phases["random"]["hit_rate"],
                       ">=", 0.2),
        common.verdict("requests failed when a replica was killed", float(phases["replica_killed"]["failed"]), "<=",
                       float(CLIENTS)),
    ]
    config = {"adapters": ADAPTERS, "capacity_per_replica": CAPACITY, "replicas": 2, "requests": REQUESTS,
              "clients": CLIENTS, "stream_every": STREAM_EVERY, "max_new_tokens": MAX_NEW, "base": "tiny (nf4)",
              "distinct_offline_answers": len(set(expected.values()))}
    path = common.save("ray_affinity", {"config": config, "phases": phases, "targets": targets})
    print(f"wrote {path}")
    return {"targets": targets}


if __name__ == "__main__":
    main()
