"""Prefix caching (issue 33): time to first token with a shared ~200-token system prompt, cold vs warm
vs the cache disabled.

SmolLM2-135M-Instruct, fp32, in-process engines on the same base (``BENCH_SMOLLM2_DIR``, default
``~/.cache/adapterhub/smollm2-135m-instruct``): one with ``--prefix-cache-mb 256`` and one with
``--prefix-cache-mb 0``. Chat requests (the template's header, a system prompt of about 200 tokens,
a short user turn), streamed, 1 new token, for the base and for a rank-16 LoRA. Each round uses a
system prompt no earlier round used and runs, for each adapter set: disabled, cold (the first
request with that system prompt), warm (the same system prompt, another user turn), disabled again;
then a burst of 8 requests sharing the system prompt (8 different user turns), warm vs disabled.
Ratios are taken within each round (the machine is shared and its speed drifts), and the table
reports their medians. Results: ``bench/results/prefix_cache-smollm2.json``.
"""

from __future__ import annotations

import statistics
import time

from . import common

ROUNDS = 5
BURST = 8
SYSTEM_WORDS = 190  # ~200 tokens with the template's header
TURNS = ["What is the capital of France?", "Name a green vegetable.", "How many legs does a spider have?",
         "Say hello in Spanish.", "What colour is the sky?", "Give me a number between 1 and 9.",
         "Which animal barks?", "What do bees make?", "Name a planet.", "What is 2 plus 3?"]




def system_prompt(round_: int) -> str:
    """A system prompt of ~200 tokens that no other round shares (its first words name the round)."""
    import random

    rng = random.Random(round_)
    body = " ".join(rng.choice(common.WORDS) for _ in range(SYSTEM_WORDS))
    return f"Session {round_}: you are a helpful assistant. Keep answers short. Background notes: {body}."


def ttft(engine, system: str, turns: list[str], adapters: list) -> float:
    """Seconds from submitting ``turns`` (together) to the last of their first tokens."""
    from adapterhub.serve.requests import GenerationRequest

    start = time.perf_counter()
    seqs = [engine.submit(GenerationRequest.build(messages=[("system", system), ("user", t)], adapters=adapters,
                                                  max_new_tokens=1)) for t in turns]
    for seq in seqs:
        next(seq.chunks())
    return time.perf_counter() - start


def main() -> dict:
    import torch

    from adapterhub.base import load_base
    from adapterhub.chat import render_prompt
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import Limits

    common.threads()
    base = common.smollm2_dir()
    shape = common.SHAPES["smollm2"]
    registry = common.registry(base, 1, shape)
    limits = Limits(context_length=2048)
    on = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=4, limits=limits,
                       prefix_cache_bytes=256 * 2**20)
    off = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=4, limits=limits,
                        prefix_cache_bytes=0)
    text = render_prompt(on.tokenizer, [{"role": "system", "content": system_prompt(0)},
                                        {"role": "user", "content": TURNS[0]}])
    tokens = len(on.tokenizer(text, add_special_tokens=False)["input_ids"])
    sets = {"base": [], "lora": [("a0@1", 1.0)]}
    for engine in (on, off):  # adapters loaded and the first passes warmed, outside the timing
        for adapters in sets.values():
            ttft(engine, system_prompt(-1), TURNS[:2], adapters)
    rows: dict[str, dict[str, list[float]]] = {k: {"disabled": [], "cold": [], "warm": []} for k in [*sets, "burst"]}
    for r in range(ROUNDS):
        system = system_prompt(r)
        for name, adapters in sets.items():
            first = ttft(off, system, [TURNS[0]], adapters)
            cold = ttft(on, system, [TURNS[1]], adapters)
            warm = ttft(on, system, [TURNS[2]], adapters)
            second = ttft(off, system, [TURNS[3]], adapters)
            for key, value in (("disabled", (first + second) / 2), ("cold", cold), ("warm", warm)):
                rows[name][key].append(value)
        burst = [TURNS[(r + i) % len(TURNS)] for i in range(BURST)]
        first = ttft(off, system, burst, [])
        warm = ttft(on, system, burst, [])  # warm: the base's round above cached this system prompt
        second = ttft(off, system, burst, [])
        rows["burst"]["disabled"].append((first + second) / 2)
        rows["burst"]["warm"].append(warm)
        print(f"round {r}: " + ", ".join(f"{k} " + "/".join(f"{v[-1] * 1e3:.0f}" for v in d.values() if v)
                                         for k, d in rows.items()) + " ms (disabled/cold/warm)", flush=True)
    stats = {"prompt_tokens": tokens, "hit_tokens": on.prefix_cache.hit_tokens,
             "queried_tokens": on.prefix_cache.queried_tokens, "cache_bytes": on.prefix_cache.bytes}
    on.stop(grace=1)
    off.stop(grace=1)
    results = {"base": str(base), "precision": "fp32", "threads": torch.get_num_threads(), "rounds": ROUNDS,
               "burst": BURST, **stats, "ttft_s": rows, "medians": {}}
    table = []
    for name, d in rows.items():
        ratios = {f"{k}_over_disabled": statistics.median(a / b for a, b in zip(d[k], d["disabled"]))
                  for k in ("cold", "warm") if d[k]}
        results["medians"][name] = {**{f"{k}_ms": statistics.median(v) * 1e3 for k, v in d.items() if v}, **ratios}
        table.append([name, *(f"{statistics.median(d[k]) * 1e3:.0f}" if d[k] else "" for k in ("disabled", "cold", "warm")),
                      f"{ratios.get('cold_over_disabled', float('nan')):.2f}", f"{ratios['warm_over_disabled']:.2f}"])
    print(f"TTFT, {tokens}-token chat prompts sharing a system prompt, medians of {ROUNDS} rounds (ms):")
    print(common.table(["request", "disabled", "cold", "warm", "cold/disabled", "warm/disabled"], table))
    common.save(common.result_name("prefix_cache", shape), results)
    return results


if __name__ == "__main__":
    main()
