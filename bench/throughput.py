"""(a) Mixed-batch decode throughput vs the number of distinct adapters in one batch.

Two shapes (``BENCH_BASE``, see :mod:`bench.common`). The default, ``smollm2``: SmolLM2-135M-
Instruct, 30 layers and 210 LoRA targets, the shape users run; batch 32 with N = 1, 8, 32 distinct
adapters (a rank-16 adapter here is 19.5 MB in fp32, 5.4x the small base's, and PEFT takes about
1.5 s to load each, so 128 adapters and batch 128 do not fit the 10 minutes). ``BENCH_BASE=small``:
the random 6-layer base, batch 32 (N <= 32) and 128 (every N up to 128), the engine's stress shape.

Side by side, in one process, on the same fp32 (unquantized) base and the same prompts:
adapterhub's engine (in-process, no gRPC, submitted as the unary ``Generate`` RPC does; LoRA
stacks in the base's dtype, the default, overlapped with the base layers on the core that one
torch thread leaves unused, the default there; the same engine on one core, ``--lora-overlap
off``, which uses what PEFT uses; and one with ``--lora-dtype float16``), PEFT's
mixed batch (``generate(adapter_names=...)``), PEFT one request at a time (``set_adapter`` +
``generate``), and the base model alone (``model.generate``). Greedy, 32 new tokens for every row
(EOS ignored by all contestants), prompts of exactly 16 tokens (no padding anywhere); with N
distinct adapters row i uses adapter ``i mod N``.

The machine is shared and its speed drifts over seconds, so contestants are interleaved: each of
``ROUNDS`` rounds runs every contestant once, back to back, each ratio is taken within its round,
and the tables report the median of the per-round ratios. A round's contestants at one N take a
minute or so, longer than the machine holds its speed, so at the largest batch each engine runs
N=1 right before the largest N rather than first in the round, and that pair gives its ratio to
its own N=1 (the target). The base and the engine without adapter run in ABBA order, on the small
base twice each at batch 32 (their ratio is a target within 10% of 1, and a run takes 2 s there).
One at a time does not batch, so its tok/s depends neither on the batch size nor on N: it is
sampled once per round (``ONE_AT_A_TIME_REQUESTS`` requests over the largest N's adapters) in the
batch-32 rounds and compared with every batch size. So that the whole run stays under 10 minutes
on the 2-core machine, PEFT's mixed batch is sampled in the first round only except at N=32,
where its ratio is a target (at N=128 on the small base one run of it takes about 40 s), and on
the small base batch 128 skips N=8 (measured at batch 32).
A profile of one decode step (base alone, 1 adapter, the largest N) says where time goes.

``BENCH_ENGINES=all`` adds the engine with ``--lora-dtype float16`` (about 2 minutes more);
the default runs the engine and the engine on one core. Results: ``bench/results/throughput.json``
(small base) or ``throughput-smollm2.json``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from . import common

NEW_TOKENS = 32
PROMPT_LEN = 16
ROUNDS = 3
PEFT_TARGET_N = 32  # PEFT's mixed batch runs every round at this N (the target's); at other N, in the first round only
ONE_AT_A_TIME_REQUESTS = 8  # a sample per round: its per-request cost does not depend on N or the batch


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one shape runs: distinct-adapter counts, batch sizes, and how often the cheap runs repeat."""

    ns: tuple[int, ...]
    batches: tuple[int, ...]  # the smallest holds N <= it; the largest holds every N
    skip: frozenset = frozenset()  # (batch, N) not run
    base_twice: bool = False  # the base / engine-without-adapter ABBA pair twice a round at the smallest batch
    profile_repeats: int = 15


PLANS = {
    # N=8 at batch 128 is measured at batch 32; twice ABBA at batch 32, where a run takes 2 s
    "small": Plan(ns=(1, 8, 32, 128), batches=(32, 128), skip=frozenset({(128, 8)}), base_twice=True),
    # a decode step at batch 32 takes 0.2-0.35 s here; 128 adapters would take PEFT ~3 minutes to load
    "smollm2": Plan(ns=(1, 8, 32), batches=(32,), profile_repeats=9),
}


def run_engine(engine, texts, refs, new_tokens: int | None = None) -> tuple[float, list[list[int]]]:
    from adapterhub.serve.requests import GenerationRequest

    reqs = [GenerationRequest.build(prompt=t, adapters=[(r, 1.0)] if r else [], max_new_tokens=new_tokens or NEW_TOKENS)
            for t, r in zip(texts, refs)]
    start = time.perf_counter()
    seqs = [engine.submit(r, stream=False) for r in reqs]  # as the unary Generate RPC does
    tokens = [s.result().token_ids for s in seqs]
    return time.perf_counter() - start, tokens


def run_generate(model, tok, texts, **kwargs) -> tuple[float, list[list[int]]]:
    import torch

    start = time.perf_counter()  # tokenizing is timed, as the engine's submit() tokenizes too
    ids = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kwargs)
    return time.perf_counter() - start, out[:, ids["input_ids"].shape[1]:].tolist()


def run_one_at_a_time(peft_model, tok, texts, names) -> float:
    """Seconds per request, serving ``texts`` one by one with ``set_adapter`` in between."""
    start = time.perf_counter()
    for text, name in zip(texts, names):
        peft_model.set_adapter(name)
        run_generate(peft_model, tok, [text])
    return (time.perf_counter() - start) / len(texts)


def _agree(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


ENGINES = {  # name -> (Engine.create options, what the tables call it)
    "engine": ({}, "engine (LoRA stacks fp32, LoRA overlapped on the spare core: the default with 1 torch thread)"),
    "engine_1core": ({"lora_overlap": False}, "engine on one core (--lora-overlap off: PEFT's resources)"),
    "engine_fp16": ({"lora_dtype": "float16"}, "engine with --lora-dtype float16 (overlapped)"),
}
DEFAULT_ENGINES = ("engine", "engine_1core")  # BENCH_ENGINES=all adds engine_fp16 (about 2 minutes more)


def chosen_engines() -> dict:
    """``BENCH_ENGINES``: ``all`` or a comma list of :data:`ENGINES` keys (``engine`` always runs:
    the targets are its own)."""
    wanted = os.environ.get("BENCH_ENGINES", ",".join(DEFAULT_ENGINES))
    keys = list(ENGINES) if wanted == "all" else [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ENGINES]
    if unknown:
        raise SystemExit(f"BENCH_ENGINES: unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)} or 'all'")
    return {k: ENGINES[k] for k in ENGINES if k == "engine" or k in keys}


def preload(engine, refs) -> None:
    """Each adapter into the cache and its stack slot (one token per request: loading, not timing)."""
    from adapterhub.serve.requests import GenerationRequest

    for seq in [engine.submit(GenerationRequest.build(prompt="warm", adapters=[(r, 1.0)], max_new_tokens=1), stream=False)
                for r in refs]:
        seq.result()


def series(plan, batch, engines, peft_model, plain, tok) -> dict:
    """One batch size, ``ROUNDS`` interleaved rounds; per-round tok/s, then medians of per-round ratios."""
    ns = [n for n in plan.ns if n <= batch and (batch, n) not in plan.skip]
    texts = common.prompts(tok, batch, PROMPT_LEN)
    names = {n: [f"a{i % n}" for i in range(batch)] for n in ns}
    tok_count = batch * NEW_TOKENS
    for engine in engines.values():  # every adapter into the cache and its stack slot before timing
        preload(engine, [f"a{i}@1" for i in range(max(ns))])
    engine = engines["engine"]
    # at the largest batch each engine runs N=1 right before the largest N: that pair gives the target's ratio
    paired = (1, max(ns)) if batch == max(plan.batches) and 1 in ns else ()
    groups = [(n,) for n in ns if n not in paired] + ([paired] if paired else [])
    rounds = []
    for r in range(ROUNDS):
        # the base and the engine without adapter in ABBA order (BAAB in the next round), so a
        # drift within the round hits both alike; repeated where a run is short (the plan says)
        order = ("base", "engine") if r % 2 == 0 else ("engine", "base")
        order = order + order[::-1] if batch == min(plan.batches) and plan.base_twice else order
        runs = {"base": [], "engine": []}
        for who in order:
            runs[who].append(run_generate(plain.model, tok, texts) if who == "base"
                             else run_engine(engine, texts, [None] * batch))
        t_base, base_tokens = statistics.mean(t for t, _ in runs["base"]), runs["base"][0][1]
        t_eng0, eng0_tokens = statistics.mean(t for t, _ in runs["engine"]), runs["engine"][0][1]
        rnd = {"base": tok_count / t_base, "engine_none": tok_count / t_eng0,
               "engine_none_agree": _agree(eng0_tokens, base_tokens), "by_n": {}}
        for group in groups:
            rows, tokens, peft_tokens = {n: {} for n in group}, {n: {} for n in group}, {}
            for n in group:
                if n == PEFT_TARGET_N or r == 0:
                    t_peft, peft_tokens[n] = run_generate(peft_model, tok, texts, adapter_names=names[n])
                    rows[n]["peft_mixed"] = tok_count / t_peft
            for key, contestant in engines.items():
                for n in group:  # a pair runs back to back on each engine
                    t_eng, tokens[n][key] = run_engine(contestant, texts, [f"{name}@1" for name in names[n]])
                    rows[n][key] = tok_count / t_eng
            for n, row in rows.items():
                if n in peft_tokens:
                    row["agree"] = _agree(tokens[n]["engine"], peft_tokens[n])
                for key in engines:
                    row[f"{key}_agree"] = _agree(tokens[n][key], tokens[n]["engine"])
                rnd["by_n"][n] = row
        if batch == min(plan.batches):
            k, widest = ONE_AT_A_TIME_REQUESTS, max(ns)
            rnd["one_at_a_time"] = NEW_TOKENS / run_one_at_a_time(peft_model, tok, texts[:k], names[widest][:k])
        rounds.append(rnd)
        print(f"batch {batch} round {r + 1}: base {rnd['base']:.0f} tok/s, engine without adapter {rnd['engine_none']:.0f}; "
              + "; ".join(f"N={n}: " + ", ".join(f"{k} {v[k]:.0f}" for k in engines)
                          + (f", PEFT mixed {v['peft_mixed']:.0f}" if "peft_mixed" in v else "")
                          for n, v in sorted(rnd["by_n"].items())),
              flush=True)
    med = statistics.median
    out = {"rounds": rounds,
           "base_generate_tok_s": med(r["base"] for r in rounds),
           "engine_no_adapter_tok_s": med(r["engine_none"] for r in rounds),
           "engine_no_adapter_over_generate": med(r["engine_none"] / r["base"] for r in rounds),
           "engine_no_adapter_rows_equal_to_generate": med(r["engine_none_agree"] for r in rounds),
           "by_n": {}}
    for n in ns:
        rows = [r["by_n"][n] for r in rounds]
        with_peft = [(v, r) for v, r in zip(rows, rounds) if "peft_mixed" in v]  # N != PEFT_TARGET_N: the first round
        out["by_n"][n] = {
            "peft_mixed_rounds": len(with_peft),
            "peft_mixed_tok_s": med(v["peft_mixed"] for v, _ in with_peft),
            "peft_mixed_over_base": med(v["peft_mixed"] / r["base"] for v, r in with_peft),
            "rows_equal_to_peft": med(v["agree"] for v, _ in with_peft),
        }
        for key in engines:
            out["by_n"][n].update({
                f"{key}_tok_s": med(v[key] for v in rows),
                f"{key}_over_base": med(v[key] / r["base"] for v, r in zip(rows, rounds)),
                f"{key}_over_peft_mixed": med(v[key] / v["peft_mixed"] for v, _ in with_peft),
                f"{key}_rows_equal_to_engine": med(v[f"{key}_agree"] for v in rows),
                f"{key}_over_own_n1": med(v[key] / r["by_n"][1][key] for v, r in zip(rows, rounds)),
            })
    return out


def add_one_at_a_time(results: dict) -> None:
    """One at a time (sampled in the batch-32 rounds) against every batch size's engine and base."""
    smallest = min(results["by_batch"])
    small = results["by_batch"][smallest]
    one = statistics.median(r["one_at_a_time"] for r in small["rounds"])
    results["one_at_a_time_tok_s"] = one
    for batch, res in results["by_batch"].items():
        for n, row in res["by_n"].items():
            for key in results["engines"]:
                if batch == smallest:  # the same rounds: the ratio within each round
                    row[f"{key}_over_one_at_a_time"] = statistics.median(
                        r["by_n"][n][key] / r["one_at_a_time"] for r in res["rounds"])
                else:
                    row[f"{key}_over_one_at_a_time"] = statistics.median(r["by_n"][n][key] for r in res["rounds"]) / one
            row["one_at_a_time_over_base"] = one / res["base_generate_tok_s"]


def profile_steps(engines: dict, batch: int, ns, context: int = 48, repeats: int = 15) -> dict:
    """Median seconds of one decode forward (KV cache of ``context``) per engine and N distinct
    adapters (0: none); the configurations take turns step by step, so drift hits them alike."""
    import torch

    from adapterhub.serve.engine import KVBatch
    from adapterhub.serve.batch_plan import BatchPlan

    def step(engine, n: int) -> float:
        cfg = engine.model.config
        heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        entries = [[(engine.cache.acquire(f"a{i % n}@1"), 1.0)] if n else [] for i in range(batch)]
        try:
            plan = BatchPlan(entries, engine.pool, engine.device, backend=engine.backend)
            ids, positions = torch.full((batch, 1), 65), torch.full((batch, 1), context)
            mask = torch.ones(batch, context + 1, dtype=torch.long)
            kv = KVBatch([], [(torch.randn(batch, heads, context, dim),) * 2 for _ in range(cfg.num_hidden_layers)],
                         mask[:, :-1], [0] * batch)
            start = time.perf_counter()
            engine._forward(plan, ids, mask, positions, kv.cache())
            return time.perf_counter() - start
        finally:
            for row in entries:
                for entry, _ in row:
                    engine.cache.release(entry)

    configs = [(key, n) for key in engines for n in ns]
    times = {config: [] for config in configs}
    for r in range(repeats):
        for key, n in (configs if r % 2 else configs[::-1]):
            times[(key, n)].append(step(engines[key], n))
    return {key: {n: statistics.median(times[(key, n)]) for n in ns} for key in engines}


def main() -> dict:
    import torch
    from peft import PeftModel

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    setup_start = time.perf_counter()
    common.threads()
    shape = common.shape()
    plan = PLANS[shape.name]
    widest, big = max(plan.ns), max(plan.batches)
    base_dir = common.base_dir(shape)
    reg = common.registry(base_dir, widest, shape)
    dirs = common.lora_adapters(base_dir, widest, shape)
    chosen = chosen_engines()
    engines = {}
    for key, (options, _) in chosen.items():  # each its own model: hooks are per engine
        if "lora_dtype" in options:
            options = {**options, "lora_dtype": getattr(torch, options["lora_dtype"])}
        engines[key] = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=widest + 8,
                                     max_batch=big, **options)
        engines[key].eos_id = -1  # every row makes NEW_TOKENS tokens, like min_new_tokens for generate
    plain = load_base(base_dir, "none")
    tok = plain.tokenizer
    with common.gc_paused():  # setup, not timed: PEFT's 128 adapters are ~700k new objects
        peft_model = PeftModel.from_pretrained(load_base(base_dir, "none").model, str(dirs[0]), adapter_name="a0")
        for i in range(1, widest):
            peft_model.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    peft_model.eval()
    for engine in engines.values():
        run_engine(engine, common.prompts(tok, 8, PROMPT_LEN), [None] * 8)  # warm-up
    common.freeze_heap()
    print(f"{shape.label}: setup (models, {widest} PEFT adapters, warm-up) took {time.perf_counter() - setup_start:.0f}s",
          flush=True)

    results = {"base": shape.name, "base_label": shape.label, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN,
               "threads": torch.get_num_threads(), "precision": "fp32 (unquantized) base",
               "engines": {k: v[1] for k, v in chosen.items()},
               "lora_overlap": {k: e.lora_overlap for k, e in engines.items()}, "by_batch": {}}
    for batch in plan.batches:
        results["by_batch"][batch] = series(plan, batch, engines, peft_model, plain, tok)
    add_one_at_a_time(results)
    profiles = profile_steps(engines, big, (0, 1, widest), repeats=plan.profile_repeats)
    results["profile_decode_step_s"] = {"batch": big, **profiles}
    for engine in engines.values():
        engine.stop(grace=1)

    print(f"{shape.label}: medians of {ROUNDS} interleaved rounds, {torch.get_num_threads()} torch thread(s) "
          "for every contestant:")
    for key, (_, label) in chosen.items():
        print(f"{label}:")
        rows = []
        for batch, res in results["by_batch"].items():
            rows += [[batch, n, r[f"{key}_over_own_n1"], r[f"{key}_over_base"], r["peft_mixed_over_base"],
                      r["one_at_a_time_over_base"], r[f"{key}_over_peft_mixed"], r[f"{key}_over_one_at_a_time"],
                      r["rows_equal_to_peft" if key == "engine" else f"{key}_rows_equal_to_engine"]]
                     for n, r in res["by_n"].items()]
            if key == "engine":
                rows.append([batch, "none", "", res["engine_no_adapter_over_generate"], "", "", "", "",
                             res["engine_no_adapter_rows_equal_to_generate"]])
        print(common.table(["batch", "N", "/own N=1", "/base", "PEFT mixed/base", "1-at-a-time/base",
                            "/PEFT mixed", "/1-at-a-time", "rows equal to " + ("PEFT" if key == "engine" else "engine")], rows))
    for key, prof in profiles.items():
        lora1, lora_n = prof[1] - prof[0], prof[widest] - prof[0]
        print(f"profile {key}, one decode step at batch {big}: base {prof[0] * 1e3:.1f} ms; LoRA adds "
              f"{lora1 * 1e3:.1f} ms with 1 adapter, {lora_n * 1e3:.1f} ms with {widest} distinct")
    large = results["by_batch"][big]
    results["targets"] = []
    for key in chosen:
        results["targets"].append(
            common.verdict(f"{key} N={widest} / N=1 (batch {big})", large["by_n"][widest][f"{key}_over_own_n1"], ">=", 0.9))
        for batch, res in results["by_batch"].items():
            by = res["by_n"]
            results["targets"] += [
                common.verdict(f"{key} / PEFT mixed at N=32 (batch {batch})", by[32][f"{key}_over_peft_mixed"], ">=", 2.5),
                common.verdict(f"{key} / one-at-a-time at N=32 (batch {batch})", by[32][f"{key}_over_one_at_a_time"], ">=", 10),
            ]
    for batch, res in results["by_batch"].items():
        results["targets"].append(
            common.verdict(f"engine no adapter / model.generate (batch {batch})", res["engine_no_adapter_over_generate"], ">=", 1.0))
    name = common.result_name("throughput", shape)
    common.save(name, results)

    def draw(ax):
        for (batch, res), style in zip(results["by_batch"].items(), ("--", "-") if len(plan.batches) > 1 else ("-",)):
            by = res["by_n"]
            xs = list(by)
            for key, label, color in (("engine_over_base", "adapterhub engine", "C0"),
                                      ("engine_1core_over_base", "adapterhub engine, one core", "C4"),
                                      ("engine_fp16_over_base", "adapterhub engine, fp16 LoRA", "C3"),
                                      ("peft_mixed_over_base", "PEFT mixed batch", "C1"),
                                      ("one_at_a_time_over_base", "PEFT one at a time", "C2")):
                if key not in by[xs[0]]:
                    continue
                ax.plot(xs, [by[n][key] for n in xs], style, marker="o", color=color, label=f"{label}, batch {batch}")
        ax.axhline(1.0, color="grey", linestyle=":", label="base model.generate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(plan.ns), [str(x) for x in plan.ns])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("throughput / base model (same batch)")
        ax.set_title(f"(a) mixed-batch decode throughput, {shape.name} base, fp32")
        ax.legend(fontsize=7)

    common.plot(name, draw)
    return results


if __name__ == "__main__":
    main()
