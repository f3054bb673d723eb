"""(a) Mixed-batch decode throughput vs the number of distinct adapters in one batch.

Side by side, in one process, on the same fp32 (unquantized) small base and the same prompts:
adapterhub's engine (in-process, no gRPC), PEFT's mixed batch (``generate(adapter_names=...)``),
PEFT one request at a time (``set_adapter`` + ``generate``), and the base model alone
(``model.generate``). Greedy, 32 new tokens for every row (EOS ignored by all contestants), one
batch of 32 rows (N <= 32) and of 128 rows (every N); with N distinct adapters row i uses adapter
``i mod N``. A profile of one decode step (base alone, 1 adapter, 128 adapters) says where time goes.
"""

from __future__ import annotations

import random
import time

from . import common

NS = (1, 8, 32, 128)
BATCHES = (32, 128)  # 32 for N <= 32; 128 so that N=128 fits in one batch (and every N at the same batch)
NEW_TOKENS = 32
PROMPT_LEN = 16
ONE_AT_A_TIME_REQUESTS = 16  # a sample: its per-request cost does not depend on N


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PROMPT_LEN)) for _ in range(n)]


def run_engine(engine, texts, refs) -> tuple[float, list[list[int]]]:
    from adapterhub.serve.requests import GenerationRequest

    reqs = [GenerationRequest.build(prompt=t, adapters=[(r, 1.0)] if r else [], max_new_tokens=NEW_TOKENS) for t, r in zip(texts, refs)]
    start = time.perf_counter()
    seqs = [engine.submit(r) for r in reqs]
    tokens = [s.result().token_ids for s in seqs]
    return time.perf_counter() - start, tokens


def run_generate(model, tok, texts, **kwargs) -> tuple[float, list[list[int]]]:
    import torch

    ids = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kwargs)
    return time.perf_counter() - start, out[:, ids["input_ids"].shape[1]:].tolist()


def series(batch, ns, engine, peft_model, plain, tok) -> dict:
    """One batch size: base, engine without adapters, then every N for all contestants."""
    texts = prompts(batch)
    tok_count = batch * NEW_TOKENS
    t_base, base_tokens = min(run_generate(plain.model, tok, texts) for _ in range(2))
    t_eng0, eng0_tokens = min(run_engine(engine, texts, [None] * batch) for _ in range(2))
    out = {"base_generate_tok_s": tok_count / t_base, "engine_no_adapter_tok_s": tok_count / t_eng0,
           "engine_no_adapter_rows_equal_to_generate": sum(a == b for a, b in zip(eng0_tokens, base_tokens)) / batch,
           "by_n": {}}
    print(f"batch {batch}: base model.generate {tok_count / t_base:.0f} tok/s; engine, no adapter {tok_count / t_eng0:.0f} tok/s")
    for n in ns:
        names = [f"a{i % n}" for i in range(batch)]
        refs = [f"{name}@1" for name in names]
        run_engine(engine, texts, refs)  # loads the adapters into the cache and their stack slots
        t_eng, eng_tokens = min(run_engine(engine, texts, refs) for _ in range(2))
        t_peft, peft_tokens = run_generate(peft_model, tok, texts, adapter_names=names)
        start = time.perf_counter()
        for text, name in zip(texts[:ONE_AT_A_TIME_REQUESTS], names[:ONE_AT_A_TIME_REQUESTS]):
            peft_model.set_adapter(name)
            run_generate(peft_model, tok, [text])
        t_one = (time.perf_counter() - start) * batch / ONE_AT_A_TIME_REQUESTS
        agree = sum(a == b for a, b in zip(eng_tokens, peft_tokens)) / batch
        row = {"engine_tok_s": tok_count / t_eng, "peft_mixed_tok_s": tok_count / t_peft,
               "one_at_a_time_tok_s": tok_count / t_one, "rows_equal_to_peft": agree}
        out["by_n"][n] = row
        print(f"  N={n}: engine {row['engine_tok_s']:.0f}, PEFT mixed {row['peft_mixed_tok_s']:.0f}, "
              f"one-at-a-time {row['one_at_a_time_tok_s']:.0f} tok/s; rows equal to PEFT: {agree:.2f}")
    return out


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
    plain = load_base(base_dir, "none")
    tok = plain.tokenizer
    peft_model = PeftModel.from_pretrained(load_base(base_dir, "none").model, str(dirs[0]), adapter_name="a0")
    for i in range(1, max(NS)):
        peft_model.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    peft_model.eval()
    run_engine(engine, prompts(8), [None] * 8)  # warm-up

    results = {"new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN, "precision": "fp32 (unquantized)", "by_batch": {}}
    for batch in BATCHES:
        results["by_batch"][batch] = series(batch, [n for n in NS if n <= batch], engine, peft_model, plain, tok)
    big = max(BATCHES)
    prof = {n: profile_step(engine, big, n) for n in (0, 1, max(NS))}
    results["profile_decode_step_s"] = {"batch": big, **prof}
    engine.stop(grace=1)

    rows = []
    for batch, res in results["by_batch"].items():
        base, by = res["base_generate_tok_s"], res["by_n"]
        rows += [[batch, n, r["engine_tok_s"] / by[1]["engine_tok_s"], r["engine_tok_s"] / base,
                  r["peft_mixed_tok_s"] / base, r["one_at_a_time_tok_s"] / base, r["engine_tok_s"] / r["peft_mixed_tok_s"],
                  r["engine_tok_s"] / r["one_at_a_time_tok_s"], r["rows_equal_to_peft"]] for n, r in by.items()]
        rows.append([batch, "none", "", res["engine_no_adapter_tok_s"] / base, "", "", "", "",
                     res["engine_no_adapter_rows_equal_to_generate"]])
    print(common.table(["batch", "N", "engine/own N=1", "engine/base", "PEFT mixed/base", "1-at-a-time/base",
                        "engine/PEFT mixed", "engine/1-at-a-time", "rows equal"], rows))
    lora1, lora_n = prof[1] - prof[0], prof[max(NS)] - prof[0]
    print(f"profile, one decode step at batch {big}: base {prof[0] * 1e3:.1f} ms; LoRA hooks add "
          f"{lora1 * 1e3:.1f} ms with 1 adapter, {lora_n * 1e3:.1f} ms with {max(NS)} distinct "
          f"({lora_n / prof[max(NS)]:.0%} of that step)")
    small, large = results["by_batch"][min(BATCHES)], results["by_batch"][big]
    results["targets"] = [
        common.verdict(f"engine N=128 / engine N=1 (batch {big})",
                       large["by_n"][128]["engine_tok_s"] / large["by_n"][1]["engine_tok_s"], ">=", 0.9),
    ]
    for batch, res in results["by_batch"].items():
        by = res["by_n"]
        results["targets"] += [
            common.verdict(f"engine / PEFT mixed at N=32 (batch {batch})", by[32]["engine_tok_s"] / by[32]["peft_mixed_tok_s"], ">=", 2.5),
            common.verdict(f"engine / one-at-a-time at N=32 (batch {batch})", by[32]["engine_tok_s"] / by[32]["one_at_a_time_tok_s"], ">=", 10),
            common.verdict(f"engine no adapter / model.generate (batch {batch})",
                           res["engine_no_adapter_tok_s"] / res["base_generate_tok_s"], ">=", 1.0),
        ]
    common.save("throughput", results)

    def draw(ax):
        for (batch, res), style in zip(results["by_batch"].items(), ("--", "-")):
            by, base = res["by_n"], res["base_generate_tok_s"]
            xs = list(by)
            for key, label, color in (("engine_tok_s", "adapterhub engine", "C0"), ("peft_mixed_tok_s", "PEFT mixed batch", "C1"),
                                      ("one_at_a_time_tok_s", "PEFT one at a time", "C2")):
                ax.plot(xs, [by[n][key] / base for n in xs], style, marker="o", color=color, label=f"{label}, batch {batch}")
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
