"""(g) The HTTP door against the gRPC door: the same requests to one server, tokens/s side by side.

One ``adapterhub serve --http-port`` subprocess (small base by default, ``BENCH_BASE=smollm2`` for
the real one), nf4. 32 closed-loop clients send the same seeded requests (5 LoRA adapters and the
base, greedy, 32 new tokens) through each door in turn: gRPC unary, HTTP ``/v1/completions``, and
both streamed (HTTP as server-sent events); ABBA rounds, tokens/s from the tokens the server
reported. The clients are the plain libraries (grpcio stubs, httpx), so the ratio measures the
doors, not an SDK. The small base's fast steps are the harder case for a door: its overhead is a
larger share of a step than on SmolLM2 on the CPU (or, as on a GPU, any fast step).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import common

CLIENTS = 32
PER_CLIENT = int(os.environ.get("BENCH_DOORS_REQUESTS", "4"))
NEW_TOKENS = 32
ROUNDS = int(os.environ.get("BENCH_DOORS_ROUNDS", "2"))
DOORS = ("grpc", "http", "grpc-stream", "http-stream")


def jobs(tokenizer) -> list[tuple[str | None, str]]:
    prompts = common.prompts(tokenizer, CLIENTS * PER_CLIENT, 24, seed=7)
    models = [None, "a0@1", "a1@1", "a2@1", "a3@1", "a4@1"]
    return [(models[i % len(models)], p) for i, p in enumerate(prompts)]


def send(door: str, grpc_client, http, job, base_name: str) -> int:
    """One request through ``door``; the completion tokens the server reports."""
    ref, prompt = job
    if door.startswith("grpc"):
        kwargs = dict(adapters=[ref] if ref else [], max_new_tokens=NEW_TOKENS)
        if door == "grpc":
            return grpc_client.generate(prompt, **kwargs).completion_tokens
        return list(grpc_client.stream(prompt, **kwargs))[-1].completion_tokens
    body = {"model": ref or base_name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    if door == "http":
        response = http.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    usage = 0
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:])["usage"]["completion_tokens"]
    return usage


def run(door: str, grpc_client, http, work, base_name: str) -> dict:
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> int:
        barrier.wait()
        return sum(send(door, grpc_client, http, job, base_name) for job in work[i::CLIENTS])

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(client, range(CLIENTS)))
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / elapsed}


def main() -> dict:
    import httpx
    from transformers import AutoTokenizer

    common.threads()
    which = common.shape(default="small")
    base = common.base_dir(which)
    reg = common.registry(base, 5, which)
    work = jobs(AutoTokenizer.from_pretrained(base))
    server = common.ServerProcess(base, reg, quantize="nf4", max_adapters=8, http=True)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    runs: dict[str, list[dict]] = {door: [] for door in DOORS}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", limits=limits, timeout=600) as http:
            served = http.get("/v1/models").json()["data"][0]["id"]  # the base's name in the HTTP API
            for door in DOORS:  # warm-up: adapters resident, connections open
                run(door, server.client, http, work[:CLIENTS], served)
            order = [DOORS, tuple(reversed(DOORS))]
            for r in range(ROUNDS):
                for door in order[r % 2]:
                    runs[door].append(run(door, server.client, http, work, served))
                    print(f"round {r + 1} {door:>12}: {runs[door][-1]['tok_s']:.0f} tok/s", flush=True)
    finally:
        server.stop()
    med = {door: statistics.median(x["tok_s"] for x in runs[door]) for door in DOORS}
    tokens = {door: {x["tokens"] for x in runs[door]} for door in DOORS}
    same = len({t for ts in tokens.values() for t in ts}) == 1
    rows = [["unary", med["grpc"], med["http"], med["http"] / med["grpc"]],
            ["streamed", med["grpc-stream"], med["http-stream"], med["http-stream"] / med["grpc-stream"]]]
    print(common.table(["requests", "gRPC tok/s", "HTTP tok/s", "HTTP / gRPC"], rows))
    print(f"the same tokens through every door: {same} ({sorted({t for ts in tokens.values() for t in ts})})")
    results = {"base": which.label, "served_name": served, "clients": CLIENTS, "requests": len(work),
               "new_tokens": NEW_TOKENS, "rounds": runs, "median_tok_s": med, "same_tokens": same,
               "targets": [common.verdict("HTTP / gRPC tok/s, unary", med["http"] / med["grpc"], ">=", 0.9),
                           common.verdict("HTTP / gRPC tok/s, streamed", med["http-stream"] / med["grpc-stream"],
                                          ">=", 0.9)]}
    common.save(common.result_name("doors", which), results)
    return results


if __name__ == "__main__":
    main()
