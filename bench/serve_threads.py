"""(o) Serving throughput by thread setting, alone and beside a busy neighbour: ``serve --threads``'s default.

The training counterpart (``bench/train_threads.py``) showed torch's default threads collapsing on a
2-core machine when another process holds a core. Here a real server (``AdapterServer``, gRPC, the
small preset base, unquantized) answers a fixed batch of concurrent greedy requests spread over a few
LoRA adapters and the base; tokens/s is the batch's generated tokens over its wall time. Each
candidate runs in a fresh process (torch's threads are process-wide, OpenMP reads its policy once);
the neighbour is ``yes > /dev/null``. Candidates: torch's default, one thread, and threads from the
CPU affinity, each with ``--lora-overlap auto`` (on when torch's threads leave a core unused: with
one thread the mixed batch's LoRA runs on the other core), and one thread with the overlap off.
Medians of the rounds after a warm-up; ratios against one thread.
"""

from __future__ import annotations

import os
import statistics

from bench import common

ROUNDS = int(os.environ.get("BENCH_SERVE_ROUNDS", "5"))
REQUESTS = int(os.environ.get("BENCH_SERVE_REQUESTS", "32"))
NEW_TOKENS = int(os.environ.get("BENCH_SERVE_NEW_TOKENS", "64"))
ADAPTERS = 4  # requests cycle through a0..a3 and the base
CANDIDATES = {
    "torch default": {},
    "one thread": {"THREADS": "1"},
    "one thread, overlap off": {"THREADS": "1", "OVERLAP": "off"},
    "affinity": {"THREADS": "affinity"},
}

WORKER = r"""
import json, os, statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
from adapterhub.serve.client import Client
from adapterhub.serve.server import AdapterServer, ServerOptions
base, registry, rounds, n, new, adapters = sys.argv[1:7]
rounds, n, new, adapters = int(rounds), int(n), int(new), int(adapters)
server = AdapterServer(ServerOptions(base=base, registry=registry,
                                     quantize="none", port=0, max_batch=n, max_adapters=adapters,
                                     max_new_tokens=new, lora_overlap=os.environ.get("OVERLAP", "auto"))).start()
models = [[f"a{i}@1"] for i in range(adapters)] + [[]]
client = Client(f"127.0.0.1:{server.port}", timeout=1800)
def one(i):
    reply = client.generate(f"the cat sat on the mat {i}", adapters=models[i % len(models)], max_new_tokens=new)
    return reply.completion_tokens
try:
    pool = ThreadPoolExecutor(n)
    list(pool.map(one, range(len(models))))  # warm-up: every adapter loaded, one step of each shape
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        tokens = sum(pool.map(one, range(n)))
        out.append({"tokens": tokens, "seconds": time.perf_counter() - start})
    result = {"threads": torch.get_num_threads(), "lora_overlap": server.engine.lora_overlap, "rounds": out}
finally:
    client.close()
    server.stop(grace=2)
print(json.dumps(result))
"""


def main() -> dict:
    base = common.small_base()
    registry = common.registry(base, ADAPTERS)
    results: dict = {"requests": REQUESTS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS, "adapters": ADAPTERS,
                     "quantize": "none", "cpus": len(os.sched_getaffinity(0)),
                     **common.alone_and_beside_busy(CANDIDATES, WORKER, [str(base), str(registry), str(ROUNDS),
                                                                         str(REQUESTS), str(NEW_TOKENS), str(ADAPTERS)])}
    for runs in (results["alone"], results["beside_busy"]):
        for out in runs.values():
            out["tokens_per_s"] = statistics.median(r["tokens"] / r["seconds"] for r in out["rounds"])
    rows = []
    for name in CANDIDATES:
        alone, busy_ = results["alone"][name], results["beside_busy"][name]
        rows.append([name, alone["threads"], "on" if alone["lora_overlap"] else "off", alone["tokens_per_s"],
                     busy_["tokens_per_s"],
                     alone["tokens_per_s"] / results["alone"]["one thread"]["tokens_per_s"],
                     busy_["tokens_per_s"] / results["beside_busy"]["one thread"]["tokens_per_s"]])
    print(common.table(["setting", "threads", "lora overlap", "alone tok/s", "beside busy tok/s", "alone / one thread",
                        "busy / one thread"], rows))
    common.save("serve_threads", results)
    return results


if __name__ == "__main__":
    main()
