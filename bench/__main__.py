"""``python -m bench [NAME ...]``: run the benchmarks (all by default), one after another.

Each writes ``bench/results/NAME.json`` (and most a ``NAME.png``) and prints its table and targets.
``BENCH_BASE=smollm2|small`` picks the base of (a), (d) and (f) (default: SmolLM2-135M-Instruct;
the results of a SmolLM2 run are named ``NAME-smollm2``); (b), (c) and (e) run on the small base.
(f), (p) and (w) run only where vLLM's CPU build is installed in its own venv (``bench/vllm_peer.py``).
A benchmark can also be named by its module: ``python -m bench vllm_peer`` runs (f).
"""

from __future__ import annotations

import importlib
import sys
import time

from adapterhub import huge_pages

BENCHMARKS = {
    "throughput": "(a) mixed-batch throughput vs distinct adapters, vs PEFT",
    "hotswap": "(b) hot-swap cost",
    "serving": "(c) gRPC serving under Poisson load, 5/100/1000 adapters",
    "training": "(d) training step time vs plain PEFT + Trainer",
    "memory": "(e) server memory, nf4 vs unquantized, per adapter",
    "vllm": "(f) against vLLM's CPU build, same base and LoRAs (skipped without vLLM)",
    "doors": "(g) the OpenAI HTTP door against the gRPC door, same requests, same server",
    "gpu": "(h) on a CUDA GPU: mixed-batch LoRA by backend (skipped without one)",
    "chunk_hashing": "(i) a registry read + chunk sha256 check, hashlib per chunk vs one sha256 per file",
    "exclusive_stall": "(j) how long a freeze/full request stalls running and newly arriving requests",
    "ray_affinity": "(k) Ray Serve: affinity hit rate with multiplexing on vs off, a replica killed mid-load",
    "registry_race": "(l) registry on S3 (moto) and file://: publishes and tag moves racing, two servers, cold load",
    "train_threads": "(n) training step time by thread setting, alone and beside a busy neighbour",
    "serve_threads": "(o) serving tokens/s by thread setting, alone and beside a busy neighbour",
    "chaos": "(m) a real server under mixed load on both doors: poisoned rows, disconnects, evictions, tag moves, SIGTERM",
    "fused_projections": "(q) one fused GEMM for q/k/v and one for gate/up against the five separate ones, fp32 and nf4",
    "step_passes": "(r) a step with a newcomer: one packed forward pass against the engine's prefill + decode passes (ceiling)",
    "compiled_step": "(s) a decode pass under torch.compile against eager, one fixed shape per batch size (ceiling)",
    "prefix_cache": "(u) time to first token with a shared system prompt cached, cold, and with the cache off",
    "long_prompt_stall": "(v) running streams' longest gap when a 1,000-token prompt arrives: chunked prefill vs whole",
    "prepack": "(t) base Linear weights prepacked in oneDNN's layout at load against plain F.linear, engine workload",
    "http_peer": "(p) adapterhub's OpenAI HTTP server against vLLM's, same streaming clients (skipped without vLLM)",
    "huge_pages": "(x) torch's large tensors on transparent huge pages (what the adapterhub command sets) against 4 KiB pages",
    "engine_peer": "(w) the HTTP peer's cases in-process: adapterhub's engine against vLLM's LLM.generate (skipped without vLLM)",
}
MODULES = {"vllm": "vllm_peer"}  # bench.vllm would read as vLLM itself


def resolve(names: list[str]) -> tuple[list[str], list[str]]:
    """The benchmarks ``names`` ask for, each by its name or by its module's (``vllm_peer`` is
    ``vllm``), and the names that are neither."""
    by_module = {module: name for name, module in MODULES.items()}
    known = [by_module.get(n, n) for n in names]
    return [n for n in known if n in BENCHMARKS], [n for n, k in zip(names, known) if k not in BENCHMARKS]


def main(argv: list[str]) -> int:
    huge_pages.enable()  # as the adapterhub command does, before any bench imports torch
    names, unknown = resolve(argv or list(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)} "
              f"(or a module's name: {', '.join(MODULES.values())})", file=sys.stderr)
        return 2
    summary = []
    for name in names:
        print(f"\n=== {name}: {BENCHMARKS[name]} ===", flush=True)
        start = time.perf_counter()
        results = importlib.import_module(f"bench.{MODULES.get(name, name)}").main()
        summary += [(name, t) for t in results.get("targets", [])]
        print(f"({name} took {time.perf_counter() - start:.0f}s)", flush=True)
    print("\n=== targets ===")
    for name, t in summary:
        print(f"{name:>10}: {t['name']}: {t['value']:.3f} {t['op']} {t['target']} -> {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
