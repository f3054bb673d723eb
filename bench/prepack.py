"""(t) Prepacked base weights (``--weight-prepack``, ``serve/prepack.py``) against plain ``F.linear``,
or (``BENCH_PREPACK_AGAINST=unfused``) fused q/k/v and gate/up GEMMs and norms against unfused ones.

SmolLM2-135M-Instruct, fp32, prefix cache and LoRA overlap off, ``BENCH_THREADS`` torch threads
(default 1). Against plain: two in-process engines on two loads of the same base, one with the
Linear weights reordered into oneDNN's blocked layout at load (the default), one without. Against
unfused: ONE prepacked engine, switched before each run between the default (q/k/v and gate/up
packed as one GEMM each, RMSNorm through ``serve/fused_norm.py``) and every Linear packed alone
with transformers' own norms, so both arms read the same weights in memory. The workload is the
HTTP peer bench's base case in-process: ``BATCH`` real-English prompts of ``PROMPT_TOKENS`` tokens
(:mod:`bench.http_corpus`) submitted at once, ``NEW_TOKENS`` greedy tokens each. Per run: tokens/s,
the prefill pass and the median decode step (each pass timed where the engine calls it).
``BENCH_PREPACK_ROUNDS`` (default 2) rounds in ABBA order; ratios packed / the other within each
round, medians over rounds. Also: whether the two arms' tokens are equal, and the memory the
packed copies add (the plain weights' bytes). Results: ``bench/results/prepack-smollm2.json``
(``prepack-unfused-smollm2.json``).
"""

from __future__ import annotations

import os
import statistics
import time

from . import common, http_corpus

ROUNDS = int(os.environ.get("BENCH_PREPACK_ROUNDS", "2"))
BATCH = 16
PROMPT_TOKENS = 100
NEW_TOKENS = 48
AGAINST = os.environ.get("BENCH_PREPACK_AGAINST", "plain")  # or "unfused"


def timed_passes(engine) -> dict[str, list[float]]:
    """Seconds of each prefill and decode pass the engine runs from now on."""
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    for name in times:
        real = getattr(engine.passes, name)

        def timed(*args, _real=real, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                times[_name].append(time.perf_counter() - start)

        setattr(engine.passes, name, timed)
    return times


def run(engine, times, texts) -> dict:
    from adapterhub.serve.requests import GenerationRequest

    for t in times.values():
        t.clear()
    start = time.perf_counter()
    seqs = [engine.submit(GenerationRequest.build(prompt=t, max_new_tokens=NEW_TOKENS)) for t in texts]
    results = [s.result() for s in seqs]
    wall = time.perf_counter() - start
    return {"tok_s": sum(len(r.token_ids) for r in results) / wall, "prefill_s": sum(times["prefill"]),
            "decode_step_s": statistics.median(times["decode"]), "tokens": [list(r.token_ids) for r in results]}


def fuse(engine, on: bool) -> None:
    """The engine's q/k/v and gate/up packed as one GEMM each, and its norms fused, or neither."""
    from adapterhub.serve import prepack

    engine.packed.remove()
    engine.norms.remove()
    engine.packed = prepack.PackedLinears(engine.model, fuse=on).install()
    if on:
        engine.norms.install()


def prepack_groups(engine) -> list:
    from adapterhub.serve import prepack

    return prepack.PackedLinears(engine.model).groups


def main() -> dict:
    import torch

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import Limits

    threads = common.threads()
    base = common.smollm2_dir()
    registry = common.registry(base, 1, common.SHAPES["smollm2"])
    if AGAINST not in ("plain", "unfused"):
        raise SystemExit(f"BENCH_PREPACK_AGAINST={AGAINST!r}: use plain or unfused")
    other = AGAINST
    make = lambda prepacked: Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=2,  # noqa: E731
                                           limits=Limits(context_length=2048), prefix_cache_bytes=0,
                                           lora_overlap=False, max_batch=BATCH, weight_prepack=prepacked)
    if other == "unfused":  # one engine, switched between runs: both arms read the same weights in memory
        engines = dict.fromkeys(("packed", other), make(True))
    else:
        engines = {"packed": make(True), "plain": make(False)}
    assert engines["packed"].packed is not None, "prepacking is not available here (see the engine's log)"
    extra_mb = sum(m.weight.nbytes for m in engines["packed"].packed.modules) / 2**20
    fused_groups = len(prepack_groups(engines["packed"]))
    timed = {id(e): timed_passes(e) for e in set(engines.values())}  # one timer an engine
    timers = {name: timed[id(e)] for name, e in engines.items()}
    texts = http_corpus.prompts(engines[other].tokenizer, BATCH, PROMPT_TOKENS)
    common.freeze_heap()
    for name, engine in engines.items():  # warm-up: first-call costs
        if other == "unfused":
            fuse(engine, name == "packed")
        run(engine, timers[name], texts)
    runs: dict[str, list[dict]] = {"packed": [], other: []}
    ratios: dict[str, list[float]] = {"tok_s": [], "prefill_s": [], "decode_step_s": []}
    for r in range(ROUNDS):
        order = [other, "packed", "packed", other]
        this: dict[str, list[dict]] = {"packed": [], other: []}
        for name in order if r % 2 == 0 else order[::-1]:
            if other == "unfused":
                fuse(engines[name], name == "packed")
            this[name].append(run(engines[name], timers[name], texts))
        for key in ratios:
            ratios[key].append(statistics.mean(x[key] for x in this["packed"]) / statistics.mean(x[key] for x in this[other]))
        for name in runs:
            runs[name] += this[name]
        print(f"round {r + 1}: packed / {other} tok/s {ratios['tok_s'][-1]:.2f}, prefill {ratios['prefill_s'][-1]:.2f}, "
              f"decode step {ratios['decode_step_s'][-1]:.2f}", flush=True)
    equal = sum(a == b for a, b in zip(runs["packed"][0]["tokens"], runs[other][0]["tokens"]))
    for e in set(engines.values()):
        e.stop(1)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in ("tok_s", "prefill_s", "decode_step_s")}
               for name, rs in runs.items()}
    results = {
        "environment": common.environment(), "threads": threads, "torch": torch.__version__,
        "workload": {"batch": BATCH, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "precision": "float32"},
        "rounds": ROUNDS, "against": other, "fused_groups": fused_groups,
        f"packed_over_{other}": {k: statistics.median(v) for k, v in ratios.items()},
        "ratios_by_round": ratios, "median": summary, "equal_rows": f"{equal}/{BATCH}",
        "packed_copies_mb": round(extra_mb, 1),
    }
    print(common.table(["", "tok/s", "prefill s", "decode step ms"],
                       [[n, f"{s['tok_s']:.1f}", f"{s['prefill_s']:.2f}", f"{1000 * s['decode_step_s']:.0f}"]
                        for n, s in summary.items()]))
    print(f"packed / {other}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[f"packed_over_{other}"].items())
          + f"; equal rows {equal}/{BATCH}; packed copies {extra_mb:.0f} MB")
    results["targets"] = [common.verdict(f"decode step packed / {other}", results[f"packed_over_{other}"]["decode_step_s"],
                                         "<=", 1.0)]
    common.save("prepack-smollm2" if other == "plain" else "prepack-unfused-smollm2", results)
    return results
