"""(a) Mixed-batch decode throughput vs the number of distinct adapters in one batch.

Side by side, in one process, on the same fp32 (unquantized) small base and the same prompts:
adapterhub's engine (in-process, no gRPC), PEFT's mixed batch (``generate(adapter_names=...)``),
PEFT one request at a time (``set_adapter`` + ``generate``), and the base model alone
(``model.generate``). Greedy, 32 new tokens for every row (EOS ignored by all contestants), one
batch of ``BATCH`` rows; with N distinct adapters row i uses adapter ``i mod N``.
"""

from __future__ import annotations

import os
import random
import time

from . import common

NS = (1, 8, 32, 128)
BATCH = int(os.environ.get("BENCH_BATCH", "128"))  # >= 128 so N=128 fits in one batch, same for every N
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


def main() -> dict:
    from peft import PeftModel

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    common.threads()
    base_dir = common.small_base()
    reg = common.registry(base_dir, max(NS))
    dirs = common.lora_adapters(base_dir, max(NS))
    texts = prompts(BATCH)

    engine = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=max(NS) + 8, max_batch=BATCH)
    engine.eos_id = -1  # every row makes NEW_TOKENS tokens, like min_new_tokens for generate
    plain = load_base(base_dir, "none")
    tok = plain.tokenizer
    peft_model = PeftModel.from_pretrained(load_base(base_dir, "none").model, str(dirs[0]), adapter_name="a0")
    for i in range(1, max(NS)):
        peft_model.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    peft_model.eval()

    run_engine(engine, texts[:8], [None] * 8)  # warm-up
    t_base, base_tokens = min(run_generate(plain.model, tok, texts) for _ in range(2))
    t_eng0, eng0_tokens = min(run_engine(engine, texts, [None] * BATCH) for _ in range(2))
    tok_count = BATCH * NEW_TOKENS
    results = {"batch": BATCH, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN, "precision": "fp32 (unquantized)",
               "base_generate_tok_s": tok_count / t_base, "engine_no_adapter_tok_s": tok_count / t_eng0,
               "engine_no_adapter_equals_generate": eng0_tokens == base_tokens, "by_n": {}}
    print(f"base model.generate: {tok_count / t_base:.0f} tok/s; engine, no adapter: {tok_count / t_eng0:.0f} tok/s")
    for n in NS:
        names = [f"a{i % n}" for i in range(BATCH)]
        refs = [f"{name}@1" for name in names]
        run_engine(engine, texts, refs)  # loads the adapters into the cache and their stack slots
        t_eng, eng_tokens = min(run_engine(engine, texts, refs) for _ in range(2))
        t_peft, peft_tokens = run_generate(peft_model, tok, texts, adapter_names=names)
        start = time.perf_counter()
        for text, name in zip(texts[:ONE_AT_A_TIME_REQUESTS], names[:ONE_AT_A_TIME_REQUESTS]):
            peft_model.set_adapter(name)
            run_generate(peft_model, tok, [text])
        t_one = (time.perf_counter() - start) * BATCH / ONE_AT_A_TIME_REQUESTS
        agree = sum(a == b for a, b in zip(eng_tokens, peft_tokens)) / BATCH
        row = {"engine_tok_s": tok_count / t_eng, "peft_mixed_tok_s": tok_count / t_peft,
               "one_at_a_time_tok_s": tok_count / t_one, "rows_equal_to_peft": agree}
        results["by_n"][n] = row
        print(f"N={n}: engine {row['engine_tok_s']:.0f}, PEFT mixed {row['peft_mixed_tok_s']:.0f}, "
              f"one-at-a-time {row['one_at_a_time_tok_s']:.0f} tok/s; rows equal to PEFT: {agree:.2f}")
    engine.stop(grace=1)

    base = results["base_generate_tok_s"]
    by = results["by_n"]
    rows = [[n, r["engine_tok_s"] / by[1]["engine_tok_s"], r["engine_tok_s"] / base, r["peft_mixed_tok_s"] / base,
             r["one_at_a_time_tok_s"] / base, r["engine_tok_s"] / r["peft_mixed_tok_s"],
             r["engine_tok_s"] / r["one_at_a_time_tok_s"], r["rows_equal_to_peft"]] for n, r in by.items()]
    print(common.table(["N", "engine/own N=1", "engine/base", "PEFT mixed/base", "1-at-a-time/base",
                        "engine/PEFT mixed", "engine/1-at-a-time", "rows == PEFT"], rows))
    results["targets"] = [
        common.verdict("engine N=128 / engine N=1", by[128]["engine_tok_s"] / by[1]["engine_tok_s"], ">=", 0.9),
        common.verdict("engine / PEFT mixed at N=32", by[32]["engine_tok_s"] / by[32]["peft_mixed_tok_s"], ">=", 2.5),
        common.verdict("engine / one-at-a-time at N=32", by[32]["engine_tok_s"] / by[32]["one_at_a_time_tok_s"], ">=", 10),
        common.verdict("engine no adapter / model.generate", results["engine_no_adapter_tok_s"] / base, ">=", 1.0),
    ]
    common.save("throughput", results)

    def draw(ax):
        xs = list(by)
        for key, label in (("engine_tok_s", "adapterhub engine"), ("peft_mixed_tok_s", "PEFT mixed batch"),
                           ("one_at_a_time_tok_s", "PEFT one at a time")):
            ax.plot(xs, [by[n][key] / base for n in xs], marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", label="base model.generate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(f"distinct adapters in a batch of {BATCH}")
        ax.set_ylabel("throughput / base model")
        ax.set_title("(a) mixed-batch decode throughput, small base, fp32")
        ax.legend()

    common.plot("throughput", draw)
    return results


if __name__ == "__main__":
    main()
