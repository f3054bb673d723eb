"""Long-prompt stall (issue 33): how long running streams wait when a 1,000-token prompt arrives,
with the prompt prefilled whole (``--prefill-chunk 0``, the engine before chunked prefill) vs in
chunks between decode steps (``--prefill-chunk``'s default, :data:`~adapterhub.serve.engine.PREFILL_CHUNK`).

SmolLM2-135M-Instruct, fp32, in-process engines on the same base (``BENCH_SMOLLM2_DIR``, default
``~/.cache/adapterhub/smollm2-135m-instruct``), prefix cache off in both (every round prefills the
long prompt in full), ``--lora-overlap off`` in both (the overlap's worker wants a core of its own,
which the shared machine does not give it). Eight streams (100-token prompts, 24 new tokens, half base, half a rank-16 LoRA, greedy,
EOS ignored) are decoding when the long prompt (a LoRA row) arrives. Measured per run: the longest
gap between two tokens of a running stream from the long prompt's arrival until its first token,
the running streams' median gap before it arrived (one decode step), and the long prompt's time to
first token. Rounds in ABBA order (whole, chunked, chunked, whole); ratios within each round,
medians over rounds. Results: ``bench/results/long_prompt_stall-smollm2.json``.
"""

from __future__ import annotations

import statistics
import threading
import time

from . import common

ROUNDS = 2  # x ABBA: 4 runs per engine (about 4 minutes in all on 2 lightly shared cores)
STREAMS = 8
STREAM_PROMPT = 100
STREAM_NEW = 24  # enough to outlast the long prompt's prefill in either mode
LONG_PROMPT = 1000
ENGINES = {"whole": 0, "chunked": None}  # None: the engine's default chunk


def run(engine, tok, round_: int) -> dict:
    """One run: the streams start, the long prompt arrives after their 8th token."""
    from adapterhub.serve.requests import GenerationRequest

    texts = common.prompts(tok, STREAMS, STREAM_PROMPT, seed=round_)
    long_text = common.prompts(tok, 1, LONG_PROMPT, seed=1000 + round_)[0]
    stamps: list[list[float]] = [[] for _ in texts]
    started = threading.Barrier(STREAMS + 1)

    def stream(i: int) -> None:
        adapters = [("a0@1", 1.0)] if i % 2 else []
        seq = engine.submit(GenerationRequest.build(prompt=texts[i], adapters=adapters, max_new_tokens=STREAM_NEW))
        for n, chunk in enumerate(seq.chunks()):
            stamps[i].append(time.perf_counter())
            if n == 7:
                started.wait(120)
            if chunk.result is not None:
                return

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait(120)
    arrived = time.perf_counter()
    seq = engine.submit(GenerationRequest.build(prompt=long_text, adapters=[("a0@1", 1.0)], max_new_tokens=1))
    next(seq.chunks())
    first = time.perf_counter()
    for t in threads:
        t.join()
    before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b <= arrived]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > arrived and a < first]
    return {"longest_gap_s": max(during), "step_before_s": statistics.median(before), "long_ttft_s": first - arrived}


def main() -> dict:
    import torch

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import GenerationRequest, Limits

    common.threads()
    base = common.smollm2_dir()
    shape = common.SHAPES["smollm2"]
    registry = common.registry(base, 1, shape)
    engines = {}
    from adapterhub.serve.engine import PREFILL_CHUNK

    for name, chunk in ENGINES.items():
        chunk = PREFILL_CHUNK if chunk is None else chunk
        engines[name] = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=4, max_batch=16,
                                      limits=Limits(context_length=2048), prefix_cache_bytes=0, prefill_chunk=chunk,
                                      lora_overlap=False)  # no spinning LoRA worker on cores shared with others
        engines[name].eos_id = -1  # every stream makes all its tokens
    tok = engines["whole"].tokenizer
    for engine in engines.values():  # the adapter loaded, first passes warmed
        engine.submit(GenerationRequest.build(prompt="warm up", adapters=[("a0@1", 1.0)], max_new_tokens=2)).result()
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    ratios: dict[str, list[float]] = {"longest_gap": [], "long_ttft": []}
    for r in range(ROUNDS):
        got = {}
        for i, name in enumerate(["whole", "chunked", "chunked", "whole"]):
            result = run(engines[name], tok, r * 4 + i)
            runs[name].append(result)
            got.setdefault(name, []).append(result)
            print(f"round {r} {name}: longest gap {result['longest_gap_s']:.2f}s (a step before: "
                  f"{result['step_before_s']:.3f}s), long prompt's TTFT {result['long_ttft_s']:.2f}s", flush=True)
        for key in ratios:
            mean = {n: statistics.mean(x[f"{key}_s"] for x in got[n]) for n in got}
            ratios[key].append(mean["chunked"] / mean["whole"])
    for engine in engines.values():
        engine.stop(grace=1)
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    results = {"base": str(base), "precision": "fp32", "threads": torch.get_num_threads(), "streams": STREAMS,
               "stream_prompt_tokens": STREAM_PROMPT, "long_prompt_tokens": LONG_PROMPT,
               "prefill_chunk": {**ENGINES, "chunked": PREFILL_CHUNK},
               "runs": runs, "medians": medians,
               "chunked_over_whole": {k: statistics.median(v) for k, v in ratios.items()},
               "chunked_over_whole_per_round": ratios}
    rows = [[name, f"{m['step_before_s'] * 1e3:.0f}", f"{m['longest_gap_s'] * 1e3:.0f}",
             f"{m['longest_gap_s'] / m['step_before_s']:.1f}", f"{m['long_ttft_s'] * 1e3:.0f}"] for name, m in medians.items()]
    print(f"{STREAMS} streams decoding, a {LONG_PROMPT}-token prompt arrives (medians of {2 * ROUNDS} runs each, ms):")
    print(common.table(["prefill", "decode step", "longest gap", "gap/step", "long prompt TTFT"], rows))
    print("chunked/whole, medians of per-round ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                      results["chunked_over_whole"].items()))
    common.save(common.result_name("long_prompt_stall", shape), results)
    return results


if __name__ == "__main__":
    main()
