"""(c) Serving under load through the real gRPC server (a subprocess on 127.0.0.1).

Small base, nf4 (the server's default), adapter cache of 32, rank-16 LoRA adapters. Open-loop
Poisson arrivals; each request picks adapter ``a{k}`` with probability ~ 1/(k+1) (power law,
alpha = 1) among the first ``n`` registered tasks; prompt and output lengths uniform in [8, 64]
tokens (byte-level tokenizer: a prompt of k letters is k tokens; EOS may end a reply early, so
throughput counts the tokens actually returned). The arrival rate is the capacity measured by a
closed burst with 5 adapters, so a server that slows down with more adapters falls behind and
shows it in both throughput and latency. The same seeded arrival times and lengths for every n.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time

from . import common

ADAPTER_COUNTS = (5, 100, 1000)
REQUESTS = int(os.environ.get("BENCH_SERVING_REQUESTS", "160"))
CACHE = 32


def workload(n_adapters: int, rate: float, count: int, seed: int = 0) -> list[tuple[float, str, str, int]]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(n_adapters)]
    pick = random.Random(seed + 1)
    t, jobs = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(8, 64)))
        jobs.append((t, f"a{pick.choices(range(n_adapters), weights)[0]}@1", prompt, rng.randint(8, 64)))
    return jobs


def run(client, jobs) -> dict:
    latencies, tokens, errors = [], [0], [0]
    lock = threading.Lock()

    def one(job):
        _, ref, prompt, max_new = job
        start = time.perf_counter()
        try:
            reply = client.generate(prompt, adapters=[ref], max_new_tokens=max_new)
        except Exception:
            with lock:
                errors[0] += 1
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            tokens[0] += reply.completion_tokens

    threads = []
    t0 = time.perf_counter()
    for job in jobs:
        delay = t0 + job[0] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(job,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(jobs), "errors": errors[0], "tokens": tokens[0], "elapsed_s": elapsed,
            "throughput_tok_s": tokens[0] / elapsed, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> dict:
    common.threads()
    base_dir = common.small_base()
    reg = common.registry(base_dir, max(ADAPTER_COUNTS))
    server = common.ServerProcess(base_dir, reg, quantize="nf4", max_adapters=CACHE)
    try:
        burst = workload(5, 1e6, 48, seed=99)
        run(server.client, burst[:8])  # warm-up
        calib = run(server.client, burst)
        rate = calib["requests"] / calib["elapsed_s"]
        print(f"capacity (closed burst of 48, 5 adapters): {rate:.2f} req/s; offered load = that rate")
        results = {"quantize": "nf4", "cache": CACHE, "rate_req_s": rate, "calibration": calib, "by_adapters": {}}
        for n in ADAPTER_COUNTS:
            r = run(server.client, workload(n, rate, REQUESTS))
            results["by_adapters"][n] = r
            print(f"{n} adapters: {r['throughput_tok_s']:.0f} tok/s, p50 {r['p50_s']:.2f}s, p99 {r['p99_s']:.2f}s, "
                  f"errors {r['errors']}")
    finally:
        server.stop()
    by = results["by_adapters"]
    first = by[ADAPTER_COUNTS[0]]
    print(common.table(["adapters", "tok/s", "throughput / 5 adapters", "p50 (s)", "p99 (s)", "p99 / 5 adapters", "errors"],
                       [[n, r["throughput_tok_s"], r["throughput_tok_s"] / first["throughput_tok_s"], r["p50_s"],
                         r["p99_s"], r["p99_s"] / first["p99_s"], r["errors"]] for n, r in by.items()]))
    results["targets"] = [common.verdict("throughput at 1000 adapters / at 5",
                                         by[1000]["throughput_tok_s"] / first["throughput_tok_s"], ">=", 0.9)]
    common.save("serving", results)

    def draw(ax):
        xs = list(by)
        ax.plot(xs, [by[n]["throughput_tok_s"] / first["throughput_tok_s"] for n in xs], marker="o", label="throughput / 5 adapters")
        ax.plot(xs, [by[n]["p50_s"] / first["p50_s"] for n in xs], marker="s", label="p50 latency / 5 adapters")
        ax.plot(xs, [by[n]["p99_s"] / first["p99_s"] for n in xs], marker="^", label="p99 latency / 5 adapters")
        ax.axhline(0.9, color="grey", linestyle="--", label="throughput target 0.9")
        ax.set_xscale("log")
        ax.set_xlabel(f"registered adapters (cache {CACHE}, power-law popularity)")
        ax.set_ylabel("ratio to 5 adapters")
        ax.set_title("(c) gRPC serving under Poisson load, small base nf4")
        ax.legend()

    common.plot("serving", draw)
    return results


if __name__ == "__main__":
    main()
