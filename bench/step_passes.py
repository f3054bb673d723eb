"""What a step with a newcomer would gain from one forward pass instead of two (issue 33).

The engine runs a step that admits a newcomer as two forward passes: the newcomer's prefill, then
one decode token for every running row. Each pass reads every weight of the model, and on a small
model at these batch sizes that read, not the arithmetic, sets a pass's time. vLLM's scheduler
packs both into one pass (the newcomer's tokens and the running rows' tokens in one flattened
batch, with variable-length attention). This measures the ceiling of that change on
SmolLM2-135M-Instruct (``BENCH_SMOLLM2_DIR``, default the preset's cache), with plain transformers:

- two passes: a decode pass of R rows (one token each over a 100-token cache) plus a prefill pass
  of one 100-token prompt, as the engine runs them;
- one pass: a single sequence of R + 100 tokens, a stand-in for the packed pass (same linear
  work; its attention is one causal block instead of R + 1 separate ones, a small share here).

Two and one alternate in ABBA order within each round; the table reports the median of one / two.
It measures a ceiling, not a built feature: the engine does not pack yet (see README, Engine).

    python -m bench step_passes      # writes bench/results/step_passes.json
"""

from __future__ import annotations

from . import common

ROUNDS = 5
REPEAT = 5
PROMPT = 100
RUNNING = (4, 16, 32)


def main() -> dict:
    import torch
    from transformers import DynamicCache

    base = common.smollm2_dir()
    model = common.smollm2_model()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cases, rows = {}, []
    with torch.inference_mode():
        for running in RUNNING:
            past = model(torch.randint(0, vocab, (running, PROMPT), generator=gen), use_cache=True).past_key_values
            step_ids = torch.randint(0, vocab, (running, 1), generator=gen)
            prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
            packed = torch.randint(0, vocab, (1, running + PROMPT), generator=gen)

            def two() -> None:
                cache = DynamicCache()
                for i, layer in enumerate(past.layers):
                    cache.update(layer.keys, layer.values, i)
                model(step_ids, cache=cache, use_cache=True, logits_to_keep=1)
                model(prompt, use_cache=True, logits_to_keep=1)

            def one() -> None:
                model(packed, use_cache=True, logits_to_keep=running + 1)

            ratio, ratios, two_s = common.abba(two, one, rounds=ROUNDS, repeat=REPEAT)
            cases[str(running)] = {"one_over_two": ratio, "ratios": ratios, "two_passes_ms": two_s * 1e3}
            rows.append([running, PROMPT, f"{two_s * 1e3:.0f}", f"{ratio:.2f}"])
            print(rows[-1], flush=True)
    print(common.table(["running rows", "newcomer tokens", "two passes ms", "one pass / two"], rows))
    best = min(c["one_over_two"] for c in cases.values())
    results = {"environment": common.environment(), "base": str(base), "prompt_tokens": PROMPT, "rounds": ROUNDS,
               "cases": cases, "targets": [common.verdict("one pass / two passes (ceiling)", best, "<=", 0.8)]}
    common.save("step_passes", results)
    return results


if __name__ == "__main__":
    main()
