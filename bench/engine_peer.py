"""(w) The HTTP peer's cases in-process: adapterhub's ``Engine`` against vLLM's ``LLM.generate``.

Why: :mod:`bench.http_peer` measures what a user deploys (both OpenAI servers), so its ratios mix
the engines with their doors (HTTP, streaming, detokenization, the client). The issue asks for the
same cases at the engine level too, to tell how much of each ratio is the engine's.

Same workload as http_peer: SmolLM2-135M-Instruct (:func:`bench.http_peer.base_dir`) in float32,
its 16 rank-8 random PEFT LoRAs (:func:`~bench.http_peer.make_adapters`), its prompts of exactly
100 tokens (:mod:`bench.http_corpus`: prompt i is its prompt i, and vLLM gets the same token ids),
its cases ``base`` / ``one`` / ``random`` / ``mixed`` (:func:`~bench.http_peer.case_adapters`),
greedy, 48 new tokens for every request (EOS ignored by both: ``engine.eos_id = -1`` and the
worker's ``ignore_eos``). A timed run is one burst of ``COMPLETIONS`` requests submitted at once,
both batching at most 16 rows: the engine in this process (``max_batch=16``, no LoRA overlap, no
prefix cache, 1 torch thread), vLLM in its own venv through :class:`bench.vllm_peer.VllmWorker`
(``max_num_seqs=16``, no prefix caching, ``max_model_len`` 512, one OpenMP thread and a 1 GiB KV
cache as :func:`bench.http_peer.vllm_env` gives its server). Each reply, cut at EOS and decoded,
is checked against http_peer's transformers + PEFT :func:`~bench.http_peer.reference` (the same
cache under ``bench/out/http_peer/``). After a warm-up of every case on both (every adapter loaded),
``ROUNDS`` rounds per case, adapterhub then vLLM, the next round vLLM then adapterhub; ratio =
adapterhub / vLLM tokens/s per round, and the median. Skipped, saying why, without a vLLM venv.

Run: ``python -m bench engine_peer``. Results: ``bench/results/engine_peer-smollm2.json``.
Smaller or longer runs: ``BENCH_ENGINE_COMPLETIONS`` (default 64), ``BENCH_ENGINE_ROUNDS`` (default 2).
``BENCH_ENGINE_VLLM_LORA=off`` runs the base case alone against a vLLM started without LoRA support
(``engine_peer-nolora-smollm2.json``): vLLM's LoRA layers slow its base rows too, so this is its
best base path, and adapterhub's engine is the same either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from adapterhub import huge_pages

from . import common
from .http_corpus import prompts as corpus_prompts
from .http_peer import (ADAPTERS, CONTEXT, NEW_TOKENS, PROMPT_TOKENS, RANK, base_dir, case_adapters,
                        make_adapters, publish, reference, vllm_env)
from .throughput import preload, run_engine
from .vllm_peer import VllmWorker, vllm_python

COMPLETIONS = int(os.environ.get("BENCH_ENGINE_COMPLETIONS", "64"))
ROUNDS = int(os.environ.get("BENCH_ENGINE_ROUNDS", "2"))
BATCH = 16  # rows a step runs at most, in both: http_peer's 16 clients
THREADS = 1  # compute threads each: the 2 cores here are shared (see bench.common.threads)
MAX_LORA_RANK = 16  # vLLM's LoRA buffers, as http_peer's server has them (--max-lora-rank 16)
SYSTEMS = ("adapterhub", "vllm")
VLLM_LORA = os.environ.get("BENCH_ENGINE_VLLM_LORA", "on") != "off"


def start_adapterhub(base: Path, registry: Path):
    """The engine as http_peer's ``adapterhub serve`` builds it, without its doors."""
    import torch

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    torch.set_num_threads(THREADS)
    engine = Engine.create(load_base(base, "none", dtype="float32"), AdapterSource(registry), capacity=ADAPTERS,
                           max_batch=BATCH, lora_overlap=False, prefix_cache_bytes=0)  # off, as vLLM's
    engine.eos_id = -1  # every row makes NEW_TOKENS tokens, as ignore_eos does for vLLM
    return engine


def start_vllm(python: str, base: Path, dirs: list[Path]) -> VllmWorker:
    setup = {"base": str(base), "loras": [str(d) for d in dirs], "rank": MAX_LORA_RANK, "batch": BATCH,
             "context": CONTEXT}
    log = common.OUT / "engine_peer" / "vllm-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return VllmWorker(python, setup, log, env=vllm_env(python, THREADS))


def warm_up(engine, worker: VllmWorker, ids: list[list[int]], jobs: dict) -> None:
    """Every adapter loaded into both (one token each), then each case's first batch on both, so
    no timed run pays a load or a first call."""
    if VLLM_LORA:
        preload(engine, [f"a{i}@1" for i in range(ADAPTERS)])
        worker.run([ids[i % len(ids)] for i in range(ADAPTERS)], list(range(ADAPTERS)), max_tokens=1)
    for case, job in jobs.items():
        run_engine(engine, job["texts"][:BATCH], job["refs"][:BATCH], NEW_TOKENS)
        worker.run(job["ids"][:BATCH], job["adapters"][:BATCH], max_tokens=NEW_TOKENS)
        print(f"warm-up {case} done", flush=True)


def measure(engine, worker: VllmWorker, jobs: dict) -> tuple[dict, dict]:
    """``ROUNDS`` rounds per case in ABBA order across rounds: each run's tok/s and tokens, and
    adapterhub / vLLM per round (a pause first, so the other side's threads stop spinning)."""
    runs = {(who, case): [] for who in SYSTEMS for case in jobs}
    ratios = {case: [] for case in jobs}
    for r in range(ROUNDS):
        for case in jobs:
            job, this = jobs[case], {}
            for who in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
                time.sleep(0.5)
                seconds, tokens = (run_engine(engine, job["texts"], job["refs"], NEW_TOKENS) if who == "adapterhub"
                                   else worker.run(job["ids"], job["adapters"], max_tokens=NEW_TOKENS))
                this[who] = {"tok_s": sum(map(len, tokens)) / seconds, "tokens": tokens}
                runs[(who, case)].append(this[who])
            ratios[case].append(this["adapterhub"]["tok_s"] / this["vllm"]["tok_s"])
            print(f"round {r + 1} {case}: adapterhub {this['adapterhub']['tok_s']:.1f} tok/s, vLLM "
                  f"{this['vllm']['tok_s']:.1f}, ratio {ratios[case][-1]:.2f}", flush=True)
    return runs, ratios


def summarise(runs: dict, ratios: dict, cases: dict, expected: dict, decode) -> dict:
    """Per case: tok/s medians, the ratios, and the share of replies equal to the reference, split
    into base rows and adapter rows as http_peer's summary is (which rows a mismatch hit)."""
    by_case = {}
    for case in cases:
        row = {"adapterhub_over_vllm": statistics.median(ratios[case]), "ratio_by_round": ratios[case]}
        want = [expected[f"{i}:{a}"] for i, a in enumerate(cases[case])]
        for who in SYSTEMS:
            equal = [(decode(got) == text, a is None) for run in runs[(who, case)]
                     for got, text, a in zip(run["tokens"], want, cases[case])]
            row[who] = {"tok_s": statistics.median(run["tok_s"] for run in runs[(who, case)]),
                        "tok_s_runs": [run["tok_s"] for run in runs[(who, case)]],
                        "equal_to_reference": statistics.mean(same for same, _ in equal)}
            for kind, is_base in (("base", True), ("adapter", False)):
                part = [same for same, base in equal if base == is_base]
                row[who][f"equal_{kind}_rows"] = f"{sum(part)}/{len(part)}"
        first = [runs[(who, case)][0]["tokens"] for who in SYSTEMS]
        row["systems_agree"] = statistics.mean(a == b for a, b in zip(*first))  # same tokens, all 48
        by_case[case] = row
    return by_case


def print_table(by_case: dict) -> None:
    rows = [[case, who, row[who]["tok_s"], row[who]["equal_to_reference"], row[who]["equal_base_rows"],
             row[who]["equal_adapter_rows"], f"{row['adapterhub_over_vllm']:.2f}" if who == "adapterhub" else ""]
            for case, row in by_case.items() for who in SYSTEMS]
    print(f"SmolLM2-135M-Instruct fp32, in-process, bursts of {COMPLETIONS} requests (at most {BATCH} rows a step), "
          f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} tokens each, {THREADS} thread each; medians of {ROUNDS} "
          f"ABBA round(s):")
    print(common.table(["case", "engine", "tok/s", "= reference", "base rows", "adapter rows", "adapterhub / vLLM"],
                       rows))


def main() -> dict:
    python, why = vllm_python()
    if python is None:
        print(f"skipped, vLLM is not installed here: {why}")
        return {"skipped": why, "targets": []}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench closes vLLM's worker too
    from transformers import AutoTokenizer, GenerationConfig

    torch_threads = common.threads()  # the reference's, if it computes anything (BENCH_THREADS, default 1)
    base = base_dir()
    load_before = os.getloadavg()
    tok = AutoTokenizer.from_pretrained(base)
    texts = corpus_prompts(tok, COMPLETIONS, PROMPT_TOKENS)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases = {case: rows for case, rows in case_adapters(COMPLETIONS).items() if VLLM_LORA or case == "base"}
    jobs = {case: {"texts": texts, "ids": ids, "adapters": rows, "refs": [None if a is None else f"a{a}@1" for a in rows]}
            for case, rows in cases.items()}
    eos = GenerationConfig.from_pretrained(base).eos_token_id  # where the reference cuts
    eos = set(eos if isinstance(eos, list) else [eos])

    def decode(tokens: list[int]) -> str:
        """A reply as the reference keeps it: cut at the first EOS, special tokens skipped."""
        return tok.decode(tokens[:next((j for j, t in enumerate(tokens) if t in eos), len(tokens))],
                          skip_special_tokens=True)

    with tempfile.TemporaryDirectory(prefix="engine_peer-") as tmp, contextlib.ExitStack() as stop:
        dirs = make_adapters(base, Path(tmp) / "adapters")  # seeded: http_peer's weights, so its cache serves
        pairs = sorted({(i, a) for rows in cases.values() for i, a in enumerate(rows)}, key=str)
        ref = reference(base, dirs, texts, pairs)
        print(f"reference: {len(pairs)} generations, {ref['computed']} computed now ({ref['seconds']:.0f}s)", flush=True)
        publish(dirs, Path(tmp) / "registry")
        engine = start_adapterhub(base, Path(tmp) / "registry")
        stop.callback(engine.stop, grace=1)
        start = time.perf_counter()
        worker = start_vllm(python, base, dirs if VLLM_LORA else [])
        stop.callback(worker.close)  # first, then the engine, then the temporary folder
        print(f"vLLM {worker.info['vllm']} up in {time.perf_counter() - start:.0f}s (log: {worker.log_path})", flush=True)
        warm_up(engine, worker, ids, jobs)
        common.freeze_heap()
        runs, ratios = measure(engine, worker, jobs)
    results = {"by_case": summarise(runs, ratios, cases, ref["text"], decode)}
    print_table(results["by_case"])
    results.update(
        base=str(base), model="SmolLM2-135M-Instruct", precision="float32", adapters=ADAPTERS, rank=RANK,
        completions=COMPLETIONS, max_batch=BATCH, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, rounds=ROUNDS,
        threads=THREADS, reference_threads=torch_threads, vllm=worker.info["vllm"], vllm_lora=VLLM_LORA,
        vllm_init_s=worker.info.get("init_s"), vllm_max_lora_rank=MAX_LORA_RANK,
        vllm_env={k: v for k, v in vllm_env(python, THREADS).items() if k.startswith("VLLM_") or k in ("LD_PRELOAD", huge_pages.ENV)},
        adapterhub_engine={"max_batch": BATCH, "lora_overlap": engine.lora_overlap, "prefix_cache_bytes": 0,
                           "capacity": ADAPTERS},
        reference_computed=ref["computed"], loadavg_before=load_before, loadavg_after=os.getloadavg(),
        note="2 CPU cores shared with other jobs (see loadavg_*): absolute figures are noisy; the ratios come from "
             "ABBA-ordered runs. vLLM's seconds are LLM.generate's own (token ids in, no detokenization); "
             "adapterhub's include tokenizing the prompts in submit()",
        targets=[])
    common.save(common.result_name("engine_peer" if VLLM_LORA else "engine_peer-nolora", common.SHAPES["smollm2"]),
                results)
    return results


if __name__ == "__main__":
    main()
