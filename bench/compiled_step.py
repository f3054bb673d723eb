"""Would a compiled decode pass pay (issue 33)? ``torch.compile`` against eager, one fixed shape.

The engine runs transformers' modules eagerly. This measures the ceiling of compiling them on
SmolLM2-135M-Instruct (``BENCH_SMOLLM2_DIR``, default the preset's cache), plain transformers, no
adapters: a decode pass of R rows (one token each over a 100-token cache), eager against
``torch.compile(model, dynamic=False)`` on exactly that shape, after one compile (its seconds are
reported: each new shape pays them again, which is why an engine compiles per shape bucket).
Eager and compiled alternate in ABBA order within each round; the table reports the median of
compiled / eager and checks the logits agree. A ceiling, not a built feature (see README, Engine).

    python -m bench compiled_step      # writes bench/results/compiled_step.json
"""

from __future__ import annotations

import time

from . import common

ROUNDS = 5
REPEAT = 5
CONTEXT = 100
RUNNING = (1, 16, 32)


def main() -> dict:
    import torch
    from transformers import DynamicCache

    base = common.smollm2_dir()
    model = common.smollm2_model()
    compiled = torch.compile(model, dynamic=False)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cases, rows = {}, []
    with torch.inference_mode():
        for running in RUNNING:
            past = model(torch.randint(0, vocab, (running, CONTEXT), generator=gen), use_cache=True).past_key_values
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in past.layers]
            ids = torch.randint(0, vocab, (running, 1), generator=gen)

            def step(net) -> torch.Tensor:
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):
                    cache.update(k, v, i)
                return net(ids, cache=cache, use_cache=True, logits_to_keep=1).logits

            start = time.perf_counter()
            got = step(compiled)
            compile_s = time.perf_counter() - start
            gap = (got - step(model)).abs().max().item()
            assert gap < 1e-3, f"compiled logits differ from eager by {gap}: the ratio would mean nothing"
            ratio, ratios, eager_s = common.abba(lambda: step(model), lambda: step(compiled), rounds=ROUNDS,
                                                 repeat=REPEAT)
            cases[str(running)] = {"compiled_over_eager": ratio, "ratios": ratios, "eager_ms": eager_s * 1e3,
                                   "compile_s": compile_s, "max_logit_gap": gap}
            rows.append([running, f"{eager_s * 1e3:.0f}", f"{compile_s:.0f}", f"{ratio:.2f}"])
            print(rows[-1], flush=True)
    print(common.table(["decode rows", "eager ms", "compile s", "compiled / eager"], rows))
    best = min(c["compiled_over_eager"] for c in cases.values())
    results = {"environment": common.environment(), "base": str(base), "context": CONTEXT, "rounds": ROUNDS,
               "cases": cases, "targets": [common.verdict("compiled / eager decode pass (ceiling)", best, "<=", 0.9)]}
    common.save("compiled_step", results)
    return results


if __name__ == "__main__":
    main()
