"""(h) On a CUDA GPU: the engine's mixed-batch LoRA by backend, tokens/s side by side in one run.

Skipped (with a line saying so) where torch sees no GPU; ``bench/gpu_check.sh`` runs it on a lent
machine. Small base in bfloat16 on ``cuda``, 32 rank-16 LoRA adapters, 64 concurrent requests
(each row its own adapter, two rows per adapter), 24-token prompts, 64 new tokens, greedy; the
same requests without adapters for the base's own speed. Backends: Triton (SGMV kernels) and
the plain-torch reference, on the same engine code; rounds alternate, medians of 3.
"""

from __future__ import annotations

import statistics
import time

from . import common

ROWS, NEW_TOKENS, ROUNDS = 64, 64, 3


def _run(engine, prompts, refs) -> tuple[float, list[list[int]]]:
    from adapterhub.serve.requests import GenerationRequest

    requests = [GenerationRequest.build(prompt=p, adapters=[(r, 1.0)] if r else [], max_new_tokens=NEW_TOKENS)
                for p, r in zip(prompts, refs)]
    start = time.perf_counter()
    results = [s.result() for s in [engine.submit(r, stream=False) for r in requests]]
    elapsed = time.perf_counter() - start
    return sum(r.completion_tokens for r in results) / elapsed, [r.token_ids for r in results]


def main() -> dict:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: (h) skipped (run bench/gpu_check.sh on a GPU machine)")
        return {"skipped": True, "targets": []}
    from transformers import AutoTokenizer

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.lora_backends import triton_sgmv

    base = common.small_base()
    registry = common.registry(base, 32)
    prompts = common.prompts(AutoTokenizer.from_pretrained(base), ROWS, 24, seed=5)
    mixed = [f"a{i % 32}@1" for i in range(ROWS)]
    backends = (["triton"] if triton_sgmv.available() else []) + ["torch"]
    engines = {b: Engine.create(load_base(base, "none", dtype="bfloat16", device="cuda"), AdapterSource(registry),
                                capacity=40, max_batch=ROWS, lora_backend=b) for b in backends}
    speeds: dict[str, dict[str, list[float]]] = {b: {"mixed": [], "none": []} for b in backends}
    tokens = {}
    try:
        for engine in engines.values():  # warm-up: adapters resident, kernels compiled
            _run(engine, prompts, mixed)
        for r in range(ROUNDS):
            for b in (backends if r % 2 == 0 else backends[::-1]):
                tok_s, tokens[b] = _run(engines[b], prompts, mixed)
                speeds[b]["mixed"].append(tok_s)
                speeds[b]["none"].append(_run(engines[b], prompts, [None] * ROWS)[0])
    finally:
        for engine in engines.values():
            engine.stop(grace=1)
    med = {b: {k: statistics.median(v) for k, v in s.items()} for b, s in speeds.items()}
    rows = [[b, med[b]["mixed"], med[b]["none"], med[b]["mixed"] / med[b]["none"]] for b in backends]
    print(f"{torch.cuda.get_device_name()}: {ROWS} rows, 32 distinct rank-16 LoRAs, bf16, {NEW_TOKENS} new tokens")
    print(common.table(["backend", "32 LoRAs tok/s", "no adapter tok/s", "LoRAs / none"], rows))
    results = {"device": torch.cuda.get_device_name(), "median_tok_s": med, "rounds": speeds, "targets": []}
    if "triton" in backends:
        same = sum(a == b for a, b in zip(tokens["triton"], tokens["torch"])) / ROWS
        print(f"triton / torch reference, 32 LoRAs: {med['triton']['mixed'] / med['torch']['mixed']:.2f}x; "
              f"rows with identical greedy tokens: {same:.0%} (bf16 rounding differs between kernels)")
        results["same_tokens_share"] = same
        results["targets"].append(common.verdict("32 LoRAs / no adapter tok/s, triton",
                                                 med["triton"]["mixed"] / med["triton"]["none"], ">=", 0.8))
    common.save("gpu", results)
    return results


if __name__ == "__main__":
    main()
