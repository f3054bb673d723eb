"""(a) Mixed-batch decode throughput vs the number of distinct adapters in one batch.

Side by side, in one process, on the same fp32 (unquantized) small base and the same prompts:
adapterhub's engine (in-process, no gRPC, submitted as the unary ``Generate`` RPC does; LoRA
stacks in the base's dtype, the default, and a second engine with ``--lora-dtype float16``), PEFT's
mixed batch (``generate(adapter_names=...)``), PEFT one request at a time (``set_adapter`` +
``generate``), and the base model alone (``model.generate``). Greedy, 32 new tokens for every row
(EOS ignored by all contestants), one batch of 32 rows (N <= 32) and of 128 rows (every N); with N
distinct adapters row i uses adapter ``i mod N``.

The machine is shared and its speed drifts over seconds, so contestants are interleaved: each of
``ROUNDS`` rounds runs every contestant once, back to back, each ratio is taken within its round,
and the tables report the median of the per-round ratios. One at a time does not batch, so its
tok/s does not depend on the batch size: it is sampled (``ONE_AT_A_TIME_REQUESTS`` requests) in
the batch-32 rounds and compared with both batch sizes. A profile of one decode step (base alone,
1 adapter, 128 adapters) says where time goes.
"""

from __future__ import annotations

import random
import statistics
import time

from . import common

NS = (1, 8, 32, 128)
BATCHES = (32, 128)  # 32 for N <= 32; 128 so that N=128 fits in one batch (and every N at the same batch)
NEW_TOKENS = 32
PROMPT_LEN = 16
ROUNDS = 3
ONE_AT_A_TIME_REQUESTS = 8  # a sample per round: its per-request cost does not depend on N or the batch


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PROMPT_LEN)) for _ in range(n)]


def run_engine(engine, texts, refs) -> tuple[float, list[list[int]]]:
    from adapterhub.serve.requests import GenerationRequest

    reqs = [GenerationRequest.build(prompt=t, adapters=[(r, 1.0)] if r else [], max_new_tokens=NEW_TOKENS) for t, r in zip(texts, refs)]
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


def series(batch, ns, engine, engine16, peft_model, plain, tok) -> dict:
    """One batch size, ``ROUNDS`` interleaved rounds; per-round tok/s, then medians of per-round ratios."""
    texts = prompts(batch)
    names = {n: [f"a{i % n}" for i in range(batch)] for n in ns}
    tok_count = batch * NEW_TOKENS
    for n in ns:  # load every adapter into the cache and its stack slot before timing
        run_engine(engine, texts[:n], [f"{name}@1" for name in names[n][:n]])
        run_engine(engine16, texts[:n], [f"{name}@1" for name in names[n][:n]])
    rounds = []
    for r in range(ROUNDS):
        base_first = r % 2 == 0  # alternate who goes first, so neither always gets the fresher machine
        if base_first:
            t_base, base_tokens = run_generate(plain.model, tok, texts)
        t_eng0, eng0_tokens = run_engine(engine, texts, [None] * batch)
        if not base_first:
            t_base, base_tokens = run_generate(plain.model, tok, texts)
        rnd = {"base": tok_count / t_base, "engine_none": tok_count / t_eng0,
               "engine_none_agree": _agree(eng0_tokens, base_tokens), "by_n": {}}
        for n in ns:
            t_eng, eng_tokens = run_engine(engine, texts, [f"{name}@1" for name in names[n]])
            t_peft, peft_tokens = run_generate(peft_model, tok, texts, adapter_names=names[n])
            t_16, tokens_16 = run_engine(engine16, texts, [f"{name}@1" for name in names[n]])
            row = {"engine": tok_count / t_eng, "peft_mixed": tok_count / t_peft, "agree": _agree(eng_tokens, peft_tokens),
                   "engine_fp16": tok_count / t_16, "fp16_agree": _agree(tokens_16, eng_tokens)}
            if batch == min(BATCHES):
                k = ONE_AT_A_TIME_REQUESTS
                row["one_at_a_time"] = NEW_TOKENS / run_one_at_a_time(peft_model, tok, texts[:k], names[n][:k])
            rnd["by_n"][n] = row
        rounds.append(rnd)
        print(f"batch {batch} round {r + 1}: base {rnd['base']:.0f} tok/s, engine without adapter {rnd['engine_none']:.0f}; "
              + "; ".join(f"N={n}: engine {v['engine']:.0f} (fp16 {v['engine_fp16']:.0f}), PEFT mixed {v['peft_mixed']:.0f}"
                          for n, v in rnd["by_n"].items()),
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
        out["by_n"][n] = {
            "engine_tok_s": med(v["engine"] for v in rows),
            "peft_mixed_tok_s": med(v["peft_mixed"] for v in rows),
            "engine_over_base": med(v["engine"] / r["base"] for v, r in zip(rows, rounds)),
            "peft_mixed_over_base": med(v["peft_mixed"] / r["base"] for v, r in zip(rows, rounds)),
            "engine_over_peft_mixed": med(v["engine"] / v["peft_mixed"] for v in rows),
            "engine_over_own_n1": med(v["engine"] / r["by_n"][1]["engine"] for v, r in zip(rows, rounds)),
            "rows_equal_to_peft": med(v["agree"] for v in rows),
            "engine_fp16_over_base": med(v["engine_fp16"] / r["base"] for v, r in zip(rows, rounds)),
            "engine_fp16_over_peft_mixed": med(v["engine_fp16"] / v["peft_mixed"] for v in rows),
            "engine_fp16_over_own_n1": med(v["engine_fp16"] / r["by_n"][1]["engine_fp16"] for v, r in zip(rows, rounds)),
            "fp16_rows_equal_to_fp32": med(v["fp16_agree"] for v in rows),
        }
    return out


def add_one_at_a_time(results: dict) -> None:
    """One at a time (sampled in the batch-32 rounds) against every batch size's engine and base."""
    small = results["by_batch"][min(BATCHES)]
    one = statistics.median(v["one_at_a_time"] for r in small["rounds"] for v in r["by_n"].values())
    results["one_at_a_time_tok_s"] = one
    for batch, res in results["by_batch"].items():
        for n, row in res["by_n"].items():
            for key in ("engine", "engine_fp16"):
                if batch == min(BATCHES):  # the same rounds: the ratio within each round
                    row[f"{key}_over_one_at_a_time"] = statistics.median(
                        r["by_n"][n][key] / r["by_n"][n]["one_at_a_time"] for r in res["rounds"])
                else:
                    row[f"{key}_over_one_at_a_time"] = statistics.median(r["by_n"][n][key] for r in res["rounds"]) / one
            row["one_at_a_time_over_base"] = one / res["base_generate_tok_s"]


def profile_step(engine, batch: int, n: int, context: int = 48, repeats: int = 12) -> float:
    """Median seconds of one decode forward (KV cache of ``context``) with N distinct adapters (0: none)."""
    import torch

    from adapterhub.serve.engine import KVBatch
    from adapterhub.serve.rows import BatchPlan

    cfg = engine.model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    entries = [[(engine.cache.acquire(f"a{i % n}@1"), 1.0)] if n else [] for i in range(batch)]
    try:
        plan = BatchPlan(entries, engine.stacks, engine.device)
        ids, positions = torch.full((batch, 1), 65), torch.full((batch, 1), context)
        mask = torch.ones(batch, context + 1, dtype=torch.long)
        times = []
        for _ in range(repeats):
            kv = KVBatch([], [(torch.randn(batch, heads, context, dim),) * 2 for _ in range(cfg.num_hidden_layers)],
                         mask[:, :-1])
            start = time.perf_counter()
            engine._forward(plan, ids, mask, positions, kv.cache())
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2]
    finally:
        for row in entries:
            for entry, _ in row:
                engine.cache.release(entry)


def main() -> dict:
    import torch
    from peft import PeftModel

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    common.threads()
    base_dir = common.small_base()
    reg = common.registry(base_dir, max(NS))
    dirs = common.lora_adapters(base_dir, max(NS))
    engine = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=max(NS) + 8, max_batch=max(BATCHES))
    engine.eos_id = -1  # every row makes NEW_TOKENS tokens, like min_new_tokens for generate
    engine16 = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=max(NS) + 8,
                             max_batch=max(BATCHES), lora_dtype=torch.float16)  # its own model: hooks are per engine
    engine16.eos_id = -1
    plain = load_base(base_dir, "none")
    tok = plain.tokenizer
    peft_model = PeftModel.from_pretrained(load_base(base_dir, "none").model, str(dirs[0]), adapter_name="a0")
    for i in range(1, max(NS)):
        peft_model.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    peft_model.eval()
    run_engine(engine, prompts(8), [None] * 8)  # warm-up
    run_engine(engine16, prompts(8), [None] * 8)
    common.freeze_heap()

    results = {"new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN, "precision": "fp32 (unquantized) base; engine LoRA stacks float16 (default)", "by_batch": {}}
    for batch in BATCHES:
        results["by_batch"][batch] = series(batch, [n for n in NS if n <= batch], engine, engine16, peft_model, plain, tok)
    add_one_at_a_time(results)
    big = max(BATCHES)
    prof = {n: profile_step(engine, big, n) for n in (0, 1, max(NS))}
    results["profile_decode_step_s"] = {"batch": big, **prof}
    prof16 = {n: profile_step(engine16, big, n) for n in (0, 1, max(NS))}
    results["profile_decode_step_s_fp16"] = {"batch": big, **prof16}
    engine.stop(grace=1)
    engine16.stop(grace=1)

    rows = []
    for batch, res in results["by_batch"].items():
        rows += [[batch, n, r["engine_over_own_n1"], r["engine_over_base"], r["peft_mixed_over_base"],
                  r["one_at_a_time_over_base"], r["engine_over_peft_mixed"], r["engine_over_one_at_a_time"],
                  r["rows_equal_to_peft"]] for n, r in res["by_n"].items()]
        rows.append([batch, "none", "", res["engine_no_adapter_over_generate"], "", "", "", "",
                     res["engine_no_adapter_rows_equal_to_generate"]])
    print(f"medians of {ROUNDS} interleaved rounds:")
    print(common.table(["batch", "N", "engine/own N=1", "engine/base", "PEFT mixed/base", "1-at-a-time/base",
                        "engine/PEFT mixed", "engine/1-at-a-time", "rows equal"], rows))
    print("the same engine with --lora-dtype float16:")
    print(common.table(["batch", "N", "/own N=1", "/base", "/PEFT mixed", "/1-at-a-time", "rows equal to fp32 engine"],
                       [[batch, n, r["engine_fp16_over_own_n1"], r["engine_fp16_over_base"], r["engine_fp16_over_peft_mixed"],
                         r["engine_fp16_over_one_at_a_time"], r["fp16_rows_equal_to_fp32"]]
                        for batch, res in results["by_batch"].items() for n, r in res["by_n"].items()]))
    lora1, lora_n = prof[1] - prof[0], prof[max(NS)] - prof[0]
    print(f"profile, one decode step at batch {big}: base {prof[0] * 1e3:.1f} ms; LoRA hooks add "
          f"{lora1 * 1e3:.1f} ms with 1 adapter, {lora_n * 1e3:.1f} ms with {max(NS)} distinct "
          f"({lora_n / prof[max(NS)]:.0%} of that step); with float16 stacks {(prof16[1] - prof16[0]) * 1e3:.1f} ms and "
          f"{(prof16[max(NS)] - prof16[0]) * 1e3:.1f} ms")
    large = results["by_batch"][big]
    results["targets"] = []
    for key, label in (("engine", "engine"), ("engine_fp16", "engine --lora-dtype float16")):
        results["targets"].append(common.verdict(f"{label} N=128 / N=1 (batch {big})", large["by_n"][128][f"{key}_over_own_n1"], ">=", 0.9))
        for batch, res in results["by_batch"].items():
            by = res["by_n"]
            results["targets"] += [
                common.verdict(f"{label} / PEFT mixed at N=32 (batch {batch})", by[32][f"{key}_over_peft_mixed"], ">=", 2.5),
                common.verdict(f"{label} / one-at-a-time at N=32 (batch {batch})", by[32][f"{key}_over_one_at_a_time"], ">=", 10),
            ]
    for batch, res in results["by_batch"].items():
        results["targets"].append(
            common.verdict(f"engine no adapter / model.generate (batch {batch})", res["engine_no_adapter_over_generate"], ">=", 1.0))
    common.save("throughput", results)

    def draw(ax):
        for (batch, res), style in zip(results["by_batch"].items(), ("--", "-")):
            by = res["by_n"]
            xs = list(by)
            for key, label, color in (("engine_over_base", "adapterhub engine", "C0"),
                                      ("engine_fp16_over_base", "adapterhub engine, fp16 LoRA", "C3"),
                                      ("peft_mixed_over_base", "PEFT mixed batch", "C1"),
                                      ("one_at_a_time_over_base", "PEFT one at a time", "C2")):
                ax.plot(xs, [by[n][key] for n in xs], style, marker="o", color=color, label=f"{label}, batch {batch}")
        ax.axhline(1.0, color="grey", linestyle=":", label="base model.generate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(NS), [str(x) for x in NS])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("throughput / base model (same batch)")
        ax.set_title("(a) mixed-batch decode throughput, small base, fp32")
        ax.legend(fontsize=7)

    common.plot("throughput", draw)
    return results


if __name__ == "__main__":
    main()
